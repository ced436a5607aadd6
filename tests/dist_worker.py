"""Run by tests/test_distributed.py under torchrun: train(cfg) on this rank, then write what the test compares:
RESULT_DIR/rank{r}.json (losses per step, and 4 draws of the torch generator after training) and
RESULT_DIR/rank{r}.safetensors (the full parameters as this rank holds them: gathered for FSDP2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from igpt import distributed as D
from igpt.train import train
from igpt.train_config import TrainConfig

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg, result = TrainConfig.from_dict(json.loads(sys.argv[1])), Path(sys.argv[2])
    started = D.init_distributed(torch.device("cpu"))
    res = train(cfg)
    state = get_model_state_dict(res["model"], options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}
    rank = D.get_dist_info().rank
    save_file(state, str(result / f"rank{rank}.safetensors"))
    draws = torch.rand(4).tolist()  # this rank's torch generator after training: ranks must differ (dropout)
    (result / f"rank{rank}.json").write_text(json.dumps({"losses": {str(k): v for k, v in res["losses"].items()},
                                                         "draws": draws}))
    D.cleanup(started)
