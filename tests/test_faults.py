"""Injected faults: SIGKILL at random moments and mid-checkpoint, then --resume auto; a rank killed under
torchrun --max-restarts=1; a full disk and a read-only directory during a checkpoint; a non-finite loss at
step k (on one rank of two). What must hold: resume from the newest complete checkpoint, never a partial one,
bit-identical to an uninterrupted run; errors are one clear IgptError; nothing is updated after a bad step."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from igpt_testutil import torchrun as run_torchrun
from safetensors.torch import load_file

import igpt.train as T
import igpt.train_state as TS
from igpt.errors import IgptError
from igpt.shards import load_shards
from igpt.train import train
from igpt.train_config import TrainConfig
from igpt.train_state import latest_checkpoint, list_checkpoints, load_train_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "bench" / "faults.py"
WORKER = Path(__file__).with_name("fault_worker.py")


def tiny(shards, out, **kw) -> TrainConfig:
    base = dict(data=str(shards), preset="tiny", out=str(out), steps=6, batch_size=4, warmup=1, dtype="fp32",
                eval_every=0, eval_images=8, save_every=1, keep=3, progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


def kill_trials(shards, tmp_path, *args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, str(FAULTS), "--shards", str(shards), "--work", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout)


def check_trials(res: dict) -> None:
    n, rows = res["trials"], res["rows"]
    bad = [r for r in rows if not (r["resume_exit"] == 0 and r["resumed_from"] == r["newest_valid"]
                                   and r["loaded_valid"] is not False and r["bit_identical"] and not r["leftovers_after"])]
    assert not bad, bad
    points = [r for r in rows if r["kill"].startswith("at ")]
    assert len(points) == (n + 1) // 2 and all(r["killed"] and r["mid_save"] for r in points), points
    # a random moment may fall after a (fast) run ended: no fault then, but most must land
    assert res["killed"] >= len(points) + (n - len(points)) // 2, rows
    assert res["resumed_from_newest_complete"] == n and res["partial_checkpoints_loaded"] == 0
    assert res["bit_identical_to_uninterrupted"] == n and res["leftovers_after_resume"] == 0


def test_sigkill_anywhere_then_resume_is_exact(shards, tmp_path):
    """10 trials (5 of the 7 kill points inside a checkpoint save, 5 random moments), 2 at a time; the slow test
    and bench/faults.py (which prints the README's figures) run more. ~15 s on 2 cores."""
    check_trials(kill_trials(shards, tmp_path, "--trials", "10", "--steps", "5", "--jobs", "2", "--no-plot",
                              "--rows"))


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_exact_many(shards, tmp_path):
    """20 trials: every kill point at least once, loss.png plotting included (as a real run)."""
    check_trials(kill_trials(shards, tmp_path, "--trials", "20", "--steps", "8", "--jobs", "2", "--seed", "1",
                              "--rows"))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("limit, failing", [(60_000, "model.safetensors"), (200_000, "optimizer.pt")])
def test_a_real_write_failure_is_one_line(shards, tmp_path, limit, failing):
    """A real full disk does not raise OSError in the writers: safetensors raises SafetensorError and torch.save
    RuntimeError ('unexpected pos'), so `igpt train` ended in a traceback (the tests raised OSError by hand).
    Here the write really fails: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: write() returns EFBIG)."""
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "igpt", "train", "--data", str(shards), "--out", str(out), "--preset",
                        "tiny", "--steps", "4", "--batch-size", "4", "--warmup", "1", "--save-every", "2",
                        "--dtype", "fp32", "--no-progress"], capture_output=True, text=True, preexec_fn=limited,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"igpt: error: cannot write checkpoint {out / 'checkpoints' / 'step-000002'} "
                               f"(cannot write {out / 'checkpoints'}/.step-000002."), r.stderr
    assert f"/{failing}: " in r.stderr and r.stderr.count("\n") == 1
    assert list((out / "checkpoints").iterdir()) == []  # no temporary left behind


def test_a_real_write_failure_in_prepare_names_the_output(tmp_path):
    """A full disk while prepare wrote its temporary pixel and token files said only 'igpt: error: No space left
    on device' (numpy's writes name no file); now the output folder, with nothing left behind."""
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    out = tmp_path / "sh"
    r = subprocess.run([sys.executable, "-m", "igpt", "prepare", "--data", "fashion-mnist-mini", "--n-px", "12",
                        "--palette-size", "8", "--out", str(out)], capture_output=True, text=True,
                       preexec_fn=limited, timeout=300)
    assert (r.returncode, r.stderr) == (2, f"igpt: error: {out}: File too large\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["model", "optimizer", "latest"])
def test_disk_full_during_a_checkpoint(shards, tmp_path, monkeypatch, where):
    """ENOSPC while writing step 3's checkpoint: one clear error, step 2 intact and still the one to resume."""
    out = tmp_path / "run"
    before = {}

    def full(*a, **k):
        before.update(snapshot(out / "checkpoints" / "step-000002"))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write, real_save, real_atomic = TS.write_model_files, TS.torch.save, TS.atomic_write_bytes
    if where == "model":
        monkeypatch.setattr(TS, "write_model_files", lambda f, *a, **k: full() if ".step-000003" in str(f) else real_write(f, *a, **k))
    elif where == "optimizer":
        monkeypatch.setattr(TS.torch, "save", lambda o, f, *a, **k: full() if ".step-000003" in str(f) else real_save(o, f, *a, **k))
    else:  # the directory is in place, but `latest` cannot be updated
        monkeypatch.setattr(TS, "atomic_write_bytes", lambda p, d: full() if d == b"step-000003\n" else real_atomic(p, d))
    with pytest.raises(IgptError, match=r"cannot write checkpoint .*step-000003 \(No space left on device\); "
                                        r"training stopped at step 3; the last good checkpoint is .*step-00000[23]"):
        train(tiny(shards, out))
    root = out / "checkpoints"
    assert snapshot(root / "step-000002") == before  # untouched, byte for byte
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert latest_checkpoint(root).name == ("step-000003" if where == "latest" else "step-000002")
    monkeypatch.undo()
    res = train(tiny(shards, out, resume="auto"))  # space freed: the run continues from there
    assert sorted(res["losses"]) == list(range(4 if where == "latest" else 3, 7))


def test_disk_full_outside_a_checkpoint(shards, tmp_path, monkeypatch):
    """ENOSPC writing the run's config.json or metrics: IgptError naming the file, not a traceback."""
    real = T.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "config.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    train(tiny(shards, tmp_path / "run", steps=4, stop_at=2))
    monkeypatch.setattr(T, "atomic_write_bytes", full)
    with pytest.raises(IgptError, match=r"run/config.json: No space left on device; training stopped "
                                        r"\(the last good checkpoint is .*step-000002\)"):
        train(tiny(shards, tmp_path / "run", steps=4, resume="auto"))


def test_read_only_checkpoint_directory(shards, tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing (ENOSPC variant covers the path)")
    out = tmp_path / "run"
    real = TS.save_train_checkpoint

    def chmod_then_save(root, *a, **k):
        if a[5]["step"] == 3:
            root.chmod(0o555)
        return real(root, *a, **k)

    monkeypatch.setattr(T, "save_train_checkpoint", chmod_then_save)
    try:
        with pytest.raises(IgptError, match=r"cannot write checkpoint .*step-000003 \(Permission denied\).*"
                                            r"last good checkpoint is .*step-000002"):
            train(tiny(shards, out))
    finally:
        (out / "checkpoints").chmod(0o755)
    assert latest_checkpoint(out / "checkpoints").name == "step-000002"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000001", "step-000002"]


def test_cli_reports_a_full_disk_in_one_line(shards, tmp_path):
    """The same through `igpt train`: exit status 2, `igpt: error: ...`, no traceback."""
    code = ("import errno, os, sys, igpt.train_state as TS\n"
            "real = TS.torch.save\n"
            "def save(o, f, *a, **k):\n"
            "    if '.step-000002' in str(f): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "    return real(o, f, *a, **k)\n"
            "TS.torch.save = save\n"
            "from igpt.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "train", "--data", str(shards), "--out", str(tmp_path / "run"),
                        "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--warmup", "1", "--dtype", "fp32",
                        "--save-every", "1", "--eval-every", "0", "--no-progress"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "MPLBACKEND": "Agg"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("igpt: error: cannot write checkpoint") and "No space left on device" in last, r.stderr
    assert "last good checkpoint is" in last and last.endswith("step-000001"), last


@pytest.mark.parametrize("k", [1, 4])
def test_non_finite_loss_at_step_k_changes_nothing(shards, tmp_path, monkeypatch, k):
    """NaN at step k: IgptError naming step k; the live parameters and optimizer state equal the step k-1
    checkpoint's (or the initial weights for k = 1) bit for bit."""
    seen, calls = {}, {"n": 0}
    real_loss, real_init = T.micro_loss, torch.optim.AdamW.__init__

    def init(self, params, *a, **kw):
        params = list(params)
        seen["opt"], seen["init"] = self, [p.detach().clone() for p in params]
        real_init(self, params, *a, **kw)

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss = real_loss(*a, **kw)
        return loss * float("nan") if calls["n"] == k else loss

    monkeypatch.setattr(torch.optim.AdamW, "__init__", init)
    monkeypatch.setattr(T, "micro_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(IgptError, match=f"non-finite loss .* at step {k}; stopped before the optimizer step"):
        train(tiny(shards, out))
    opt = seen["opt"]
    live = [p for g in opt.param_groups for p in g["params"]]  # the model's own parameters
    if k == 1:
        assert latest_checkpoint(out / "checkpoints") is None and not opt.state
        assert all(torch.equal(a.detach(), b) for a, b in zip(live, seen["init"], strict=True))
        return
    ckpt = out / "checkpoints" / f"step-{k - 1:06d}"
    assert latest_checkpoint(out / "checkpoints") == ckpt
    mcfg = T.resolve_model_config(tiny(shards, out), load_shards(shards).meta)
    names = [n for n, _ in T.ImageGPT(mcfg).named_parameters()]  # the optimizer's order
    saved, state = load_file(ckpt / "model.safetensors"), load_train_checkpoint(ckpt, mcfg)
    assert len(names) == len(live)
    for name, p in zip(names, live, strict=True):  # weights, Adam moments and step count all as at step k-1
        assert torch.equal(p.detach(), saved[name]), name
        ours, theirs = opt.state[p], state["optim"]["state"][name]
        assert all(torch.equal(torch.as_tensor(ours[s]), torch.as_tensor(theirs[s])) for s in ("exp_avg", "exp_avg_sq", "step"))


# -- two ranks under torchrun ------------------------------------------------------------------------------
def torchrun(cfg: TrainConfig, result: Path, fault: str, *extra: str) -> subprocess.CompletedProcess:
    result.mkdir(parents=True, exist_ok=True)
    return run_torchrun(*extra, str(WORKER), json.dumps(cfg.to_dict()), str(result), fault, MPLBACKEND="Agg")


@pytest.mark.distributed
def test_killed_rank_restarts_and_resumes_from_its_last_checkpoint(shards, tmp_path):
    """Rank 1 is SIGKILLed after step 5 (checkpoints every 2 steps); torchrun --max-restarts=1 restarts both
    ranks, which resume from step-000004 and finish; the result matches an uninterrupted 1-process run."""
    cfg = tiny(shards, tmp_path / "two", steps=8, save_every=2, batch_size=8, micro_batch_size=4, resume="auto")
    r = torchrun(cfg, tmp_path / "res", "kill:1:5", "--max-restarts=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reports = [json.loads((tmp_path / "res" / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [(x["restart"], x["resumed_from"], x["error"]) for x in reports] == [(1, "step-000004", None)] * 2
    assert [sorted(map(int, x["losses"])) for x in reports] == [list(range(5, 9))] * 2
    ref = train(tiny(shards, tmp_path / "one", steps=8, save_every=2, batch_size=8, micro_batch_size=4))
    p0, p1 = (load_file(tmp_path / "res" / f"rank{i}.safetensors") for i in (0, 1))
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    one = ref["model"].state_dict()
    assert max((p0[k] - one[k]).abs().max().item() for k in p0) <= 1e-5
    assert max(abs(reports[0]["losses"][str(s)] - ref["losses"][s]) for s in range(5, 9)) <= 1e-5


@pytest.mark.distributed
def test_nan_on_one_rank_stops_every_rank_before_the_update(shards, tmp_path):
    cfg = tiny(shards, tmp_path / "two", steps=6, save_every=1, batch_size=8, micro_batch_size=4)
    r = torchrun(cfg, tmp_path / "res", "nan:1:4")
    assert r.returncode != 0
    reports = [json.loads((tmp_path / "res" / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert all(x["error"] and "non-finite loss (nan) at step 4" in x["error"] for x in reports), reports
    root = tmp_path / "two" / "checkpoints"
    assert latest_checkpoint(root).name == "step-000003" and not (root / "step-000004").exists()


@pytest.mark.distributed
def test_a_failed_metrics_write_on_rank_0_stops_every_rank_promptly(shards, tmp_path):
    """Only rank 0 writes the run's files; when that fails (a full disk) the other rank must not wait for it in
    the next collective until the process group's timeout."""
    import time

    cfg = tiny(shards, tmp_path / "two", steps=20, save_every=100, batch_size=8, micro_batch_size=4)
    t = time.monotonic()
    r = torchrun(cfg, tmp_path / "res", "full:0:3")
    took = time.monotonic() - t
    assert r.returncode != 0
    report = json.loads((tmp_path / "res" / "rank0.json").read_text())
    assert "No space left on device" in report["error"] and "metrics.jsonl" in report["error"]
    assert took < 60, (took, r.stderr[-8000:])  # a hung worker's stacks (fault_worker's faulthandler) included


@pytest.mark.distributed
def test_the_igpt_command_ends_every_rank_of_a_failed_distributed_run_promptly(shards, tmp_path):
    """`torchrun -m igpt train` whose loss turns non-finite on every rank (lr 1e10): each rank prints the one-line
    error and ends at once with exit code 2 (cli.failed -> distributed.exit_failed_rank), without tearing down
    the process group (which can deadlock in torch's gloo destructor right after a collective)."""
    import time

    t = time.monotonic()
    r = run_torchrun("-m", "igpt", "train", "--data", str(shards), "--preset", "tiny", "--steps", "20", "--warmup", "1",
                     "--batch-size", "8", "--lr", "1e10", "--dtype", "fp32", "--eval-every", "0", "--no-progress",
                     "--out", str(tmp_path / "run"), MPLBACKEND="Agg")
    took = time.monotonic() - t
    assert r.returncode != 0
    assert r.stderr.count("igpt: error: non-finite loss (") == 2, r.stderr[-3000:]  # one per rank
    assert "exitcode  : 2" in r.stderr, r.stderr[-3000:]  # torchrun's report of the ranks' exit code
    assert "Traceback" not in r.stderr.split("failed (exitcode")[0], r.stderr[-3000:]  # only torchrun's, after
    assert took < 60, (took, r.stderr[-3000:])
