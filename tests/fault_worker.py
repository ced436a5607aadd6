"""Run by tests/test_faults.py under torchrun: train(cfg) on this rank with one injected fault, then write
RESULT_DIR/rank{r}.json ({'losses', 'resumed_from', 'restart', 'error'}) and, on success, the full parameters
as RESULT_DIR/rank{r}.safetensors.

Faults (argv[3]):
  kill:R:K   rank R sends itself SIGKILL after optimizer step K, on torchrun's first attempt only
  nan:R:K    rank R's loss at step K is NaN (the other ranks' are fine)
  full:R:K   rank R's metrics write at step K fails with ENOSPC (only rank 0 writes metrics)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import igpt.train as T
from igpt import distributed as D
from igpt.errors import IgptError
from igpt.train_config import TrainConfig

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg, result = TrainConfig.from_dict(json.loads(sys.argv[1])), Path(sys.argv[2])
    kind, fault_rank, fault_step = sys.argv[3].split(":")
    fault_rank, fault_step = int(fault_rank), int(fault_step)
    rank, restart = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    report = {"restart": restart, "resumed_from": None, "error": None, "losses": {}}
    if kind == "full":  # this case once hung now and then (a gloo teardown deadlock, fixed by exit_failed_rank):
        # a process still alive after 90 s prints every thread's stack to stderr and exits; the test shows it
        import faulthandler

        faulthandler.dump_traceback_later(90, exit=True)
    real_load, real_loss, real_lr = T.load_train_checkpoint, T.micro_loss, T.lr_at
    calls = {"loss": 0}

    def load(path, *a, **k):
        report["resumed_from"] = Path(path).name
        return real_load(path, *a, **k)

    def lr_at(step, *a, **k):  # called at the start of step step + 1: step optimizer steps are done
        if kind == "kill" and rank == fault_rank and restart == 0 and step == fault_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_lr(step, *a, **k)

    def micro_loss(model, pixels, *a, **k):
        loss = real_loss(model, pixels, *a, **k)
        calls["loss"] += 1  # one micro-batch per step in these runs
        return loss * float("nan") if kind == "nan" and rank == fault_rank and calls["loss"] == fault_step else loss

    T.load_train_checkpoint, T.lr_at, T.micro_loss = load, lr_at, micro_loss
    if kind == "full" and rank == fault_rank:
        import errno

        real_log = T.RunLog.log

        def log(self, row):
            if row.get("step") == fault_step and "loss" in row:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.out / "metrics.jsonl"))
            return real_log(self, row)

        T.RunLog.log = log
    started = D.init_distributed(torch.device("cpu"))
    try:
        res = T.train(cfg)
    except IgptError as e:
        report["error"] = str(e)
        (result / f"rank{rank}.json").write_text(json.dumps(report))
        D.exit_failed_rank(2)  # as the igpt command ends a failed rank
    state = get_model_state_dict(res["model"], options=StateDictOptions(full_state_dict=True))
    save_file({k: v.detach().clone() for k, v in state.items()}, str(result / f"rank{rank}.safetensors"))
    report["losses"] = {str(k): v for k, v in res["losses"].items()}
    (result / f"rank{rank}.json").write_text(json.dumps(report))
    D.cleanup(started)
