"""Review of the training / checkpoint / resume path (sixteenth session): each test fails on the code before the
fixes, for the reason its docstring states."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import igpt.train_state as TS
from igpt.errors import IgptError
from igpt.train import train
from igpt.train_config import TrainConfig
from igpt.train_state import list_checkpoints, load_train_checkpoint


def tiny(shards, out, **kw) -> TrainConfig:
    base = dict(data=str(shards), preset="tiny", out=str(out), steps=4, batch_size=4, warmup=1, dtype="fp32",
                eval_every=0, eval_images=8, save_every=2, progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


def params_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# 1. A RANK that is not a rank of the job (RANK=1, WORLD_SIZE unset): the run thought it was rank 1 of 1, so no
#    rank wrote anything (no config, metrics or checkpoint), it took no lock, and it exited 0.
def test_a_rank_outside_the_job_is_refused_not_a_run_that_writes_nothing(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(IgptError, match="RANK=1.*WORLD_SIZE=1"):
        train(tiny(shards, tmp_path / "run", steps=2))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("env, says", [({"RANK": "abc"}, "RANK='abc' is not an integer"),
                                       ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT unset")])
def test_a_bad_rank_environment_is_one_line(shards, tmp_path, env, says):
    """RANK=abc was a ValueError traceback; WORLD_SIZE=2 without torchrun a traceback from the rendezvous."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "igpt", "train", "--data", str(shards), "--preset", "tiny", "--out",
                        str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--warmup", "1", "--dtype", "fp32",
                        "--no-progress"], capture_output=True, text=True, timeout=300,
                       env={**full, "OMP_NUM_THREADS": "1", **env})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr


# 2. A training checkpoint whose optimizer.pt / rng.pt load but are not whole: load_train_checkpoint passed them,
#    and resuming then ended in a traceback (IndexError, TypeError) or trained silently on another optimizer state
#    (Adam's moments or step count missing, integer moments) instead of being damaged (--resume auto falls back).
def _no_ranks(c):
    torch.save({"ranks": []}, c / "rng.pt")


def _edit_optim(fn):
    def edit(c):
        o = torch.load(c / "optimizer.pt", weights_only=True)
        fn(o)
        torch.save(o, c / "optimizer.pt")
    return edit


DAMAGE = {
    "no rng states": _no_ranks,
    "no optimizer state": _edit_optim(lambda o: o.__setitem__("state", {})),
    "no step counts": _edit_optim(lambda o: [s.pop("step") for s in o["state"].values()]),
    "integer moments": _edit_optim(lambda o: [s.__setitem__("exp_avg", s["exp_avg"].long()) for s in o["state"].values()]),
    "eps not a number": _edit_optim(lambda o: o["param_groups"][0].__setitem__("eps", None)),
}


@pytest.fixture(scope="module")
def run4(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("r4") / "run"
    train(tiny(shards, out, stop_at=4, steps=6))  # step-000002 and step-000004
    return out


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_an_optimizer_or_rng_state_that_is_not_whole_is_a_damaged_checkpoint(run4, tmp_path, what):
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    newest = out / "checkpoints" / "step-000004"
    DAMAGE[what](newest)
    from igpt.checkpoint import read_config

    with pytest.raises(IgptError, match=r"(optimizer|rng)\.pt"):
        load_train_checkpoint(newest, read_config(newest))


def test_resume_auto_sets_aside_a_checkpoint_without_rng_states(shards, run4, tmp_path, capsys):
    """The newest checkpoint's rng.pt holds {'ranks': []}: an IndexError traceback at resume; now it is set
    aside as damaged and the run resumes from the one before, ending as an uninterrupted run does."""
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    _no_ranks(out / "checkpoints" / "step-000004")
    res = train(tiny(shards, out, steps=6, resume="auto"))
    assert "holds no RNG state" in capsys.readouterr().err
    assert (out / "checkpoints" / "step-000004.unreadable").is_dir()
    ref = train(tiny(shards, tmp_path / "ref", steps=6))
    assert params_equal(res["model"], ref["model"])


# 3. activation_checkpointing only bounds memory (the same blocks are recomputed with the same dropout masks: a
#    run with it is bit-identical to one without on CPU), yet a resume that turned it on (a run moved to a card
#    with less memory) was refused as a changed setting, as micro_batch_size was until the tenth session.
def test_activation_checkpointing_may_change_on_resume_and_the_run_stays_exact(shards, tmp_path):
    kw = dict(objective="bert", dropout=0.1, augment=True)
    ref = train(tiny(shards, tmp_path / "ref", **kw))
    train(tiny(shards, tmp_path / "run", stop_at=2, **kw))
    res = train(tiny(shards, tmp_path / "run", resume="auto", activation_checkpointing=True, **kw))
    assert res["losses"] == {k: v for k, v in ref["losses"].items() if k > 2}
    assert params_equal(res["model"], ref["model"])


# 4. A run killed in its last step's save after the new checkpoint was renamed into place but before the oldest
#    was pruned: resuming the finished run has no step left, so no save pruned, and --keep 2 kept 3 for good.
def test_keep_holds_after_a_kill_before_the_last_save_pruned(shards, tmp_path, monkeypatch):
    real = TS.atomic_write_bytes

    def dies(path, data):
        if path.name == TS.LATEST and data.strip() == b"step-000003":
            raise KeyboardInterrupt  # (SIGKILL there: the directory is in place, `latest` and the pruning not done)
        return real(path, data)

    monkeypatch.setattr(TS, "atomic_write_bytes", dies)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(shards, tmp_path / "run", steps=3, keep=2, save_every=1))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002", "step-000003"]
    monkeypatch.setattr(TS, "atomic_write_bytes", real)
    assert train(tiny(shards, tmp_path / "run", steps=3, keep=2, save_every=1, resume="auto"))["losses"] == {}
    assert [p.name for p in list_checkpoints(root)] == ["step-000002", "step-000003"]
