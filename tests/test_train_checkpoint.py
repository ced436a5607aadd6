"""Training checkpoints: exact resume across processes, atomic saves, the latest pointer, safe loading."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import igpt.train_state as TS
from igpt.checkpoint import load_model
from igpt.errors import IgptError
from igpt.train import train
from igpt.train_config import TrainConfig
from igpt.train_state import latest_checkpoint, list_checkpoints

FLAGS = ["--preset", "tiny", "--steps", "8", "--batch-size", "8", "--micro-batch-size", "4", "--warmup", "2",
         "--lr", "3e-3", "--dtype", "fp32", "--log-every", "1", "--eval-every", "3", "--eval-images", "32",
         "--dropout", "0.1", "--augment", "--objective", "bert", "--no-progress"]


def igpt(*args):
    r = subprocess.run([sys.executable, "-m", "igpt", "train", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def test_resume_is_exact_after_the_process_stops(shards, tmp_path):
    """N steps in one go == K steps, process exits, a new process resumes to N: the same loss at every step
    (dropout, BERT masks and augmentation included) and bit-identical parameters and optimizer state."""
    a, b = tmp_path / "a", tmp_path / "b"
    igpt("--data", str(shards), "--out", str(a), "--save-every", "100", *FLAGS)
    igpt("--data", str(shards), "--out", str(b), "--save-every", "100", "--stop-at", "5", *FLAGS)
    assert latest_checkpoint(b / "checkpoints").name == "step-000005"
    with open(b / "metrics.jsonl", "a") as f:  # rows an interrupted process wrote after its checkpoint
        f.write(json.dumps({"step": 6, "loss": 99.0}) + "\n")
    igpt("--data", str(shards), "--out", str(b), "--save-every", "100", "--resume", "auto", *FLAGS)
    assert losses(a) == losses(b) and len(losses(a)) == 8 + 3
    ca, cb = a / "checkpoints" / "step-000008", b / "checkpoints" / "step-000008"
    pa, pb = load_file(ca / "model.safetensors"), load_file(cb / "model.safetensors")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True) for c in (ca, cb))
    assert all(torch.equal(oa["state"][k][s], ob["state"][k][s]) for k in oa["state"] for s in oa["state"][k])
    model, palette = load_model(cb)  # a training checkpoint is a model checkpoint too
    assert model.config.mode == "bert" and palette.k == 8


def tiny(shards, out, **kw):
    base = dict(data=str(shards), preset="tiny", out=str(out), steps=4, batch_size=4, warmup=1, dtype="fp32",
                eval_every=0, eval_images=8, save_every=2, progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


def test_interrupted_save_leaves_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    real = TS.torch.save

    def dies(obj, f, *a, **k):
        if "step-000004" in str(f) or ".step-000004" in str(f):
            raise KeyboardInterrupt
        return real(obj, f, *a, **k)

    monkeypatch.setattr(TS.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(shards, tmp_path / "run"))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-000002"]
    assert latest_checkpoint(root).name == "step-000002" and not any(p.name.startswith(".") for p in root.iterdir())
    # a directory without train_state.json (say, copied half-way) never counts as a checkpoint
    (root / "step-000009").mkdir()
    (root / "step-000009" / "model.safetensors").write_bytes(b"")
    (root / "latest").write_text("step-000009\n")
    assert latest_checkpoint(root).name == "step-000002"


def test_resume_of_a_finished_run_removes_what_its_killed_last_save_left(shards, tmp_path, monkeypatch):
    """The last step's save is cut short while it prunes the oldest checkpoint (half-deleted, hidden): resuming
    the finished run has no step left to run, and still removes it (no later save would)."""
    real = TS.shutil.rmtree

    def dies(path, *a, **k):
        if str(path).endswith(".deleting"):
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(TS.shutil, "rmtree", dies)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(shards, tmp_path / "run", steps=3, keep=2, save_every=1))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".step-000001.deleting", "latest", "step-000002",
                                                      "step-000003"]
    monkeypatch.setattr(TS.shutil, "rmtree", real)
    assert train(tiny(shards, tmp_path / "run", steps=3, keep=2, save_every=1, resume="auto"))["losses"] == {}
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000003"]


def test_resume_auto_sets_a_damaged_newest_checkpoint_aside_and_uses_the_one_before(shards, tmp_path, capsys):
    """The newest checkpoint's weights are damaged after it was written: --resume auto warns, keeps it as
    step-NNNNNN.unreadable, resumes from the previous one, and ends where an undisturbed run ends."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny(shards, a, steps=6, keep=2))
    train(tiny(shards, b, steps=6, keep=2))
    root = b / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-000004", "step-000006"]
    damaged = root / "step-000006" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    capsys.readouterr()
    train(tiny(shards, b, steps=6, keep=2, resume="auto"))
    err = capsys.readouterr().err
    assert "step-000006/model.safetensors: corrupt" in err and "kept as step-000006.unreadable" in err
    assert "resuming from step-000004" in err
    assert (root / "step-000006.unreadable" / "model.safetensors").stat().st_size == 100  # nothing lost
    assert latest_checkpoint(root).name == "step-000006" and (root / "latest").read_text() == "step-000006\n"
    pa, pb = (load_file(r / "checkpoints" / "step-000006" / "model.safetensors") for r in (a, b))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)  # the replayed steps 5-6 are the same steps
    # an explicit --resume of a damaged checkpoint is an error, not a fallback
    damaged = root / "step-000006" / "optimizer.pt"
    damaged.write_bytes(b"not a torch file")
    with pytest.raises(IgptError, match="optimizer.pt"):
        train(tiny(shards, b, steps=6, keep=2, resume=str(root / "step-000006")))


def test_resume_refuses_another_model_and_changed_settings(shards, tmp_path):
    train(tiny(shards, tmp_path / "run", steps=2))
    with pytest.raises(IgptError, match="checkpoint of another model.*n_layer"):
        train(tiny(shards, tmp_path / "run", steps=2, resume="auto", model_overrides={"n_layer": 3}))
    with pytest.raises(IgptError, match=r"changed settings \['lr'\]"):
        train(tiny(shards, tmp_path / "run", steps=2, resume="auto", lr=0.1))
    res = train(tiny(shards, tmp_path / "run", steps=2, resume="auto", log_every=2))  # bookkeeping may change
    assert res["losses"] == {}


def test_the_micro_batch_size_may_change_on_resume(shards, tmp_path):
    """It only bounds memory, and a run moved to another rank count may need another one: it was refused as a
    changed setting (a run started with --micro-batch-size could not continue on other ranks at all)."""
    whole = train(tiny(shards, tmp_path / "a", objective="bert", micro_batch_size=2))
    train(tiny(shards, tmp_path / "b", objective="bert", micro_batch_size=2, stop_at=2))
    rest = train(tiny(shards, tmp_path / "b", objective="bert", resume="auto"))  # one micro-batch of 4 now
    assert sorted(rest["losses"]) == [3, 4]
    assert [rest["losses"][n] for n in (3, 4)] == pytest.approx([whole["losses"][n] for n in (3, 4)], rel=1e-5)
    with pytest.raises(IgptError, match="no such checkpoint"):
        train(tiny(shards, tmp_path / "other", resume=str(tmp_path / "nothing")))


def test_resume_knows_the_shards_by_content_not_by_path(shards, tmp_path):
    """The same shards under another path resume (the path was compared and refused them); other shards under
    the run's own path are refused (they resumed silently: another split, other token meanings)."""
    import shutil

    from igpt.prepare import PrepareConfig, prepare
    from igpt.shards import load_shards

    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    train(tiny(moved, tmp_path / "run", steps=4, stop_at=2))
    shutil.rmtree(moved)
    shutil.copytree(shards, tmp_path / "elsewhere")
    res = train(tiny(tmp_path / "elsewhere", tmp_path / "run", steps=4, stop_at=3, resume="auto"))
    assert sorted(res["losses"]) == [3]
    prepare(PrepareConfig(out=str(moved), data="fashion-mnist-mini", n_px=8, palette_size=8, val_fraction=0.2))
    with pytest.raises(IgptError, match=r"cannot resume on other shards: .* differs from the run's in counts"):
        train(tiny(moved, tmp_path / "run", steps=4, resume="auto"))
    # the same palette and split sizes, another split seed: other images in train and val (it resumed)
    prepare(PrepareConfig(out=str(moved), data="fashion-mnist-mini", n_px=8, palette=str(shards / "palette.npy"),
                          seed=1))
    assert load_shards(moved).meta["counts"] == load_shards(shards).meta["counts"]
    with pytest.raises(IgptError, match=r"cannot resume on other shards: .* in tokens_sample_sha256"):
        train(tiny(moved, tmp_path / "run", steps=4, resume="auto"))


def test_resume_keeps_the_precision_the_run_trained_in(shards, tmp_path, monkeypatch):
    """Checkpoints record the resolved dtype. --dtype auto means bf16 on a CPU with native bf16 and fp32
    elsewhere: resuming a run elsewhere must not change its precision silently (it did: the saved word 'auto'
    matched), and an explicit --dtype that names the run's precision resumes it."""
    import igpt.train as T

    run = tmp_path / "run"
    train(tiny(shards, run, steps=4, stop_at=2, dtype="auto"))  # whatever auto is here: pin it below
    saved = json.loads((latest_checkpoint(run / "checkpoints") / "train_state.json").read_text())["dtype"]
    other = {"float32": ("bf16", torch.bfloat16), "bfloat16": ("fp32", torch.float32)}[saved]
    flag = {"float32": "fp32", "bfloat16": "bf16"}[saved]
    monkeypatch.setattr(T, "pick_dtype", lambda name, device: other[1])  # another machine: auto means the other
    with pytest.raises(IgptError, match=f"the run trained in {saved}, but --dtype auto means .* on this cpu; "
                                        f"resume with --dtype {flag} to keep its precision"):
        train(tiny(shards, run, steps=4, stop_at=3, dtype="auto", resume="auto"))
    monkeypatch.undo()
    with pytest.raises(IgptError, match=f"the run trained in {saved}, but --dtype {other[0]} means"):
        train(tiny(shards, run, steps=4, stop_at=3, dtype=other[0], resume="auto"))
    res = train(tiny(shards, run, steps=4, stop_at=3, dtype=flag, resume="auto"))  # 'auto' -> its meaning: fine
    assert sorted(res["losses"]) == [3]


def test_metrics_rows_are_durable_before_each_checkpoint(shards, tmp_path, monkeypatch):
    """metrics.jsonl is fsynced after its last row and before every checkpoint is written: a power loss could
    otherwise keep a checkpoint but drop rows logged before it (the page cache holds them), and the resumed run
    would have a gap (flush alone reaches the OS, not the disk)."""
    import os

    import igpt.train as T
    import igpt.train_log as TL

    events, fsync, log, save = [], os.fsync, TL.RunLog.log, T.save_train_checkpoint

    def record_fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(TL.RunLog, "log", lambda self, row: (events.append(("row", row["step"])), log(self, row)))
    monkeypatch.setattr(T, "save_train_checkpoint", lambda *a: (events.append(("save", a[-2]["step"])), save(*a)))
    train(tiny(shards, tmp_path / "run", steps=4, save_every=2, eval_every=2))
    saves = [i for i, e in enumerate(events) if e[0] == "save"]
    assert [events[i][1] for i in saves] == [2, 4]
    for i in saves:
        last_row = max(j for j in range(i) if events[j][0] == "row")
        assert ("fsync", "metrics.jsonl") in events[last_row:i], events


def test_resume_auto_without_checkpoint_starts_fresh(shards, tmp_path):
    res = train(tiny(shards, tmp_path / "run", steps=2, resume="auto"))
    assert sorted(res["losses"]) == [1, 2]


def test_a_fresh_run_never_mixes_with_an_old_one(shards, tmp_path):
    train(tiny(shards, tmp_path / "run", steps=2))
    with pytest.raises(IgptError, match="already holds a run with checkpoints; continue it with --resume auto"):
        train(tiny(shards, tmp_path / "run", steps=2))


@pytest.mark.gpu
def test_cuda_bf16_compiled_training_learns_and_resumes(shards, tmp_path):
    """The GPU path of `igpt train --compile`: bf16 autocast, compiled blocks, fused AdamW; a run stopped at
    step 4 and resumed follows the uninterrupted one (to GPU kernels' run-to-run rounding)."""
    kw = dict(steps=8, batch_size=16, warmup=1, lr=3e-3, device="cuda", dtype="bf16", compile=True, save_every=4)
    a = train(tiny(shards, tmp_path / "a", **kw))
    train(tiny(shards, tmp_path / "b", stop_at=4, **kw))
    b = train(tiny(shards, tmp_path / "b", resume="auto", **kw))
    assert sorted(b["losses"]) == [5, 6, 7, 8]
    assert all(b["losses"][n] == pytest.approx(a["losses"][n], rel=2e-2) for n in b["losses"])
    assert max(a["losses"][n] for n in (7, 8)) < a["losses"][1]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["device"] == "cuda"
    model, _ = load_model(a["checkpoint"])  # loads on the CPU
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.gpu
def test_the_rng_state_is_that_of_the_training_device():
    """Saved and restored for the device trained on, not the current CUDA device (a 1-process run on cuda:1)."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    st = TS.rng_state(dev)
    a = torch.rand(4, device=dev)
    TS.set_rng_state(st, device=dev)
    assert torch.equal(a, torch.rand(4, device=dev))
    assert "cuda" not in TS.rng_state(torch.device("cpu"))


def test_resume_drops_a_metrics_row_cut_short(shards, tmp_path):
    """A process killed (or a disk filled) while appending to metrics.jsonl leaves half a row as its last line:
    resuming drops it and goes on; a bad line elsewhere is a one-line error, not a JSON traceback."""
    from igpt.train_log import read_metrics

    run = tmp_path / "run"
    train(tiny(shards, run, steps=6, stop_at=3))
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 4, "loss": 2.')
    res = train(tiny(shards, run, steps=6, resume="auto"))
    assert sorted(res["losses"]) == [4, 5, 6]
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(IgptError, match="line 2 is not a metrics row"):
        read_metrics(metrics)


def test_a_train_state_without_its_settings_is_an_unreadable_checkpoint(shards, tmp_path):
    """train_state.json holds the run's settings (resume compares them); a file without them is a damaged
    checkpoint (IgptError, so --resume auto falls back to the one before), not a KeyError."""
    train(tiny(shards, tmp_path / "run", steps=4))
    ck = tmp_path / "run" / "checkpoints" / "step-000004"
    state = json.loads((ck / "train_state.json").read_text())
    good = dict(state)
    del state["train_config"]
    (ck / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(IgptError, match="unreadable training checkpoint"):
        TS.load_train_checkpoint(ck, load_model(ck)[0].config)
    # damaged fields failed later, one after a step had been computed (a string best_val_loss)
    for field, value in (("shards", 5), ("shards", ["a"]), ("step", -3), ("best_val_loss", "x"), ("step", True)):
        (ck / "train_state.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(IgptError, match="unreadable training checkpoint"):
            TS.load_train_checkpoint(ck, load_model(ck)[0].config)


def test_a_symlinked_step_folder_never_leads_outside_the_run(shards, tmp_path):
    """A link at checkpoints/step-000004 to a folder elsewhere: the save replaced the folder it points to
    (deleting its files); now the link alone is replaced, and pruning removes links without following them."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    train(tiny(shards, tmp_path / "run", steps=6, stop_at=2, keep=1))
    root = tmp_path / "run" / "checkpoints"
    (root / "step-000004").symlink_to(precious)
    train(tiny(shards, tmp_path / "run", steps=6, resume="auto", keep=1))
    assert (precious / "thesis.txt").read_text() == "years of work" and len(list(precious.iterdir())) == 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000006"]  # step 4 (a folder now) pruned


def test_nothing_to_do_names_the_step_the_run_is_at(shards, tmp_path, capsys):
    from igpt.cli import main

    args = ["train", "--data", str(shards), "--out", str(tmp_path / "r"), "--preset", "tiny", "--steps", "10",
            "--batch-size", "4", "--warmup", "1", "--dtype", "fp32", "--eval-every", "0", "--no-progress"]
    assert main([*args, "--stop-at", "4"]) == 0
    capsys.readouterr()
    assert main([*args, "--stop-at", "4", "--resume", "auto"]) == 0
    assert f"nothing to do: {tmp_path / 'r'} is already at step 4\n" in capsys.readouterr().out  # it said 10


def test_an_explicit_resume_matches_the_precision_not_the_dtype_word(shards, tmp_path):
    """`--resume auto --dtype fp32` of a run begun with `auto` (fp32 here) resumed; `--resume DIR` of the same
    checkpoint compared the words in config.json and refused the run's own folder as "another run"."""
    from igpt.train import pick_dtype

    word = "fp32" if pick_dtype("auto", torch.device("cpu")) == torch.float32 else "bf16"  # what auto means here
    train(tiny(shards, tmp_path / "a", dtype="auto", stop_at=2))
    train(tiny(shards, tmp_path / "a", dtype=word, stop_at=2, resume="auto"))  # nothing to do
    res = train(tiny(shards, tmp_path / "a", dtype=word, resume=str(tmp_path / "a" / "checkpoints" / "step-000002")))
    assert sorted(res["losses"]) == [3, 4]


def test_an_explicit_resume_into_another_run_is_refused(shards, tmp_path):
    """--resume A's checkpoint with --out B (another run, another seed) mixed the two: B's metrics rows and
    checkpoints beside A's. Refused, naming what differs, with B untouched; into A's own folder it resumes."""
    train(tiny(shards, tmp_path / "a", steps=6, stop_at=4, save_every=2))
    train(tiny(shards, tmp_path / "b", steps=6, stop_at=2, save_every=2, seed=7))
    before = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    ck = tmp_path / "a" / "checkpoints" / "step-000004"
    with pytest.raises(IgptError, match=r"holds another run \(its seed differ"):
        train(tiny(shards, tmp_path / "b", steps=6, save_every=2, resume=str(ck)))
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == before
    res = train(tiny(shards, tmp_path / "a", steps=6, save_every=2, resume=str(ck)))
    assert sorted(res["losses"]) == [5, 6]


def test_an_explicit_resume_never_writes_over_another_branch_or_a_foreign_folder(shards, tmp_path):
    """--resume DIR of an older step into a run that has later checkpoints would overwrite them and then prune
    the new ones by step number (leaving `latest` pointing at nothing); into a folder igpt did not write, it
    would mix with what is there. Both are one-line errors that change nothing."""
    run = tmp_path / "run"
    train(tiny(shards, run, steps=6, save_every=2, keep=3))
    root = run / "checkpoints"
    before = [p.name for p in list_checkpoints(root)]
    with pytest.raises(IgptError, match=r"step 2\).*later checkpoints \(step-000004, step-000006\)"):
        train(tiny(shards, run, steps=6, save_every=1, keep=1, resume=str(root / "step-000002")))
    assert [p.name for p in list_checkpoints(root)] == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(IgptError, match="igpt did not write"):
        train(tiny(shards, foreign, steps=6, resume=str(root / "step-000002")))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # the same checkpoint copied under another name: its step comes from its train_state.json
    import shutil

    shutil.copytree(root / "step-000002", tmp_path / "saved-at-2")
    with pytest.raises(IgptError, match=r"step 2\).*later checkpoints"):
        train(tiny(shards, run, steps=6, save_every=1, keep=1, resume=str(tmp_path / "saved-at-2")))
    assert [p.name for p in list_checkpoints(root)] == before
    # into a new folder it branches off as before
    res = train(tiny(shards, tmp_path / "branch", steps=6, resume=str(root / "step-000002")))
    assert sorted(res["losses"]) == [3, 4, 5, 6]


def test_an_rng_state_that_loads_but_does_not_apply_makes_the_checkpoint_unreadable(shards, tmp_path, capsys):
    """rng.pt unpickles (weights-only) but holds a torch state of the wrong size: --resume auto must treat the
    checkpoint as damaged and fall back to the one before, as for any other damaged file, not stop."""
    run = tmp_path / "run"
    train(tiny(shards, run, steps=6, keep=3))
    rng = run / "checkpoints" / "step-000006" / "rng.pt"
    state = torch.load(rng, weights_only=True)
    state["ranks"][0]["torch"] = torch.zeros(3, dtype=torch.uint8)
    torch.save(state, rng)
    with pytest.raises(IgptError, match=r"rng.pt \(rank 0\): damaged RNG state"):
        TS.load_train_checkpoint(rng.parent, load_model(rng.parent)[0].config)
    capsys.readouterr()
    train(tiny(shards, run, steps=6, keep=3, resume="auto"))
    err = capsys.readouterr().err
    assert "damaged RNG state" in err and "resuming from step-000004" in err
