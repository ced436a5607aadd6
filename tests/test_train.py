"""Training: data stream, augmentation, guards against bad configs and non-finite losses, run outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import igpt.train as T
from igpt.errors import IgptError
from igpt.loader import BatchStream, crop_flip, reflect_index
from igpt.train import train
from igpt.train_config import TrainConfig
from igpt.train_state import latest_checkpoint


def tiny(shards, out, **kw) -> TrainConfig:
    base = dict(data=str(shards), preset="tiny", out=str(out), steps=6, batch_size=8, warmup=2, lr=3e-3,
                dtype="fp32", log_every=1, eval_every=0, eval_images=32, save_every=3, progress=False)
    return TrainConfig(**{**base, **kw})


# -- data stream -----------------------------------------------------------------------------------------------
def test_ranks_take_disjoint_parts_of_each_global_batch():
    tokens = np.arange(50 * 4, dtype=np.uint16).reshape(50, 4)
    one = BatchStream(tokens, 2, 12, seed=3)
    for step in (0, 3, 4, 9):  # step 4 straddles the epoch boundary (48 .. 59 of 50)
        parts = [BatchStream(tokens, 2, 12, seed=3, rank=r, world_size=3).rows(step) for r in range(3)]
        assert np.array_equal(np.concatenate(parts), one.rows(step))
    epoch0 = np.concatenate([one.rows(s) for s in range(4)])[:48]
    assert len(set(epoch0.tolist())) == 48  # no repeats within an epoch
    assert np.array_equal(BatchStream(tokens, 2, 12, seed=3).rows(7), one.rows(7))  # a pure function of step


def test_masks_and_augmentation_do_not_depend_on_the_rank_split():
    tokens = np.random.default_rng(0).integers(0, 8, (40, 16)).astype(np.uint16)
    full, m, scored = BatchStream(tokens, 4, 8, seed=1).batch_at(2, "bert", 0.3, True)
    parts = [BatchStream(tokens, 4, 8, seed=1, rank=r, world_size=2).batch_at(2, "bert", 0.3, True) for r in (0, 1)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full) and torch.equal(torch.cat([p[1] for p in parts]), m)
    assert scored == int(m.any(1).sum()) == parts[0][2] == parts[1][2]  # the global batch's, on every rank
    big = BatchStream(tokens, 4, 8, seed=2**61).batch_at(2, "bert", 0.3, True)  # any allowed seed works
    assert big[0].shape == full.shape


def test_crop_flip_on_token_grids():
    x = np.arange(2 * 16).reshape(2, 16)
    assert np.array_equal(crop_flip(x, 4, 1, np.array([[1, 1], [1, 1]]), np.array([False, False])), x)
    flipped = crop_flip(x, 4, 1, np.array([[1, 1], [1, 1]]), np.array([True, False]))
    assert np.array_equal(flipped[0].reshape(4, 4), x[0].reshape(4, 4)[:, ::-1]) and np.array_equal(flipped[1], x[1])
    shifted = crop_flip(x[:1], 4, 1, np.array([[0, 2]]), np.array([False]))  # up 1 (reflect), right 1
    ref = np.pad(x[0].reshape(4, 4), 1, mode="reflect")[0:4, 2:6]
    assert np.array_equal(shifted[0].reshape(4, 4), ref)
    assert reflect_index(np.array([-2, -1, 0, 3, 4, 5]), 4).tolist() == [2, 1, 0, 3, 2, 1]


# -- guards --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_data_no_group(monkeypatch):
    """Fail the test if training reads token data or starts a process group."""
    def boom(*a, **k):
        raise AssertionError("read data or started a process group")
    monkeypatch.setattr(T.D, "init_distributed", boom)
    monkeypatch.setattr(T, "BatchStream", boom)


@pytest.mark.parametrize("kw, env, message", [
    (dict(batch_size=8), {"WORLD_SIZE": "3"}, "not divisible by the 3 ranks"),
    (dict(batch_size=8, micro_batch_size=3), {}, "ranks x micro_batch_size"),
    (dict(batch_size=8, micro_batch_size=4), {"WORLD_SIZE": "4", "RANK": "1"}, r"ranks x micro_batch_size \(4 x 4\)"),
    (dict(preset="nope"), {}, "unknown model preset 'nope'"),
    (dict(model_overrides={"n_px": 4}), {}, "longer than|larger than|position table"),
    (dict(model_overrides={"n_px": 16}), {}, "n_px 16 contradicts the shards"),
    (dict(model_overrides={"palette_size": 16}), {}, "palette_size 16 contradicts the shards"),
    (dict(model_overrides={"n_px": "4"}), {}, "override n_px must be an integer, got '4'"),
])
def test_contradictory_configs_fail_before_data_or_process_group(shards, tmp_path, monkeypatch, no_data_no_group,
                                                                kw, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(IgptError, match=message):
        train(tiny(shards, tmp_path / "run", **kw))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kw, field", [(dict(steps=0), "steps"), (dict(objective="gan"), "objective"),
                                       (dict(dtype="fp8"), "dtype"), (dict(stop_at=9), "stop_at"),
                                       (dict(model_overrides={"mode": "ar"}), "mode"),
                                       (dict(time_limit=0), "time_limit"), (dict(time_limit=True), "time_limit"),
                                       (dict(lr=float("inf")), "lr"), (dict(weight_decay=float("nan")), "weight_decay"),
                                       (dict(grad_clip=float("nan")), "grad_clip"),
                                       (dict(steps=6, warmup=7), "warmup"), (dict(seed=2**62), "seed")])
def test_config_fields_are_validated(shards, tmp_path, kw, field):
    with pytest.raises(IgptError, match=field):
        tiny(shards, tmp_path, **kw)


def test_nan_loss_stops_before_the_optimizer_step(shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = T.ar_loss

    def poisoned(logits, pixels):  # the 5th micro-batch loss (step 5) is NaN
        calls["n"] += 1
        loss = real(logits, pixels)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(T, "ar_loss", poisoned)
    steps_done = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (steps_done.append(1), real_step(self, *a, **k))[1])
    with pytest.raises(IgptError, match="non-finite loss .* at step 5"):
        train(tiny(shards, tmp_path / "run"))
    assert len(steps_done) == 4  # steps 1-4 only: the poisoned step never reached the optimizer
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-000003"


def test_non_finite_gradient_stops_before_the_optimizer_step(shards, tmp_path, monkeypatch):
    """A finite loss whose gradient overflows (here: a hook makes step 3's gradients inf) must not reach the
    weights, so no checkpoint can hold what it would have made of them."""
    run = tiny(shards, tmp_path / "run", save_every=1)
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(params, *a, **k):
        calls["n"] += 1
        params = list(params)
        if calls["n"] == 3:
            params[0].grad.fill_(float("inf"))
        return real(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    with pytest.raises(IgptError, match="non-finite gradient norm .* at step 3"):
        train(run)
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last.name == "step-000002"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())


def test_out_that_holds_a_model_is_refused(shards, tmp_path):
    from igpt_testutil import tiny_model

    from igpt.checkpoint import save_model

    ck = save_model(tmp_path / "model", tiny_model(n_px=8, palette_size=8))
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    with pytest.raises(IgptError, match="holds a model"):
        train(tiny(shards, ck))
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


def test_an_empty_val_split_reports_no_validation_loss(shards, tmp_path):
    """`prepare --val-fraction 0` writes a val split with no images: there is nothing to score, which must not
    show as a validation loss of 0 (nor as a best_val_loss of 0 in the checkpoints)."""
    import shutil

    sh = Path(shutil.copytree(shards, tmp_path / "sh"))
    meta = json.loads((sh / "meta.json").read_text())
    for f in sh.glob("val_*.npy"):
        a = np.load(f, allow_pickle=False)
        np.save(f, a[:0])
    meta["counts"]["val"] = 0
    (sh / "meta.json").write_text(json.dumps(meta))
    res = train(tiny(sh, tmp_path / "run", eval_every=2))
    assert res["val"] == {}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("val_loss" in r for r in rows)
    for f in sh.glob("train_*.npy"):  # an empty train split (hand-made: prepare refuses to write one) was an
        np.save(f, np.load(f, allow_pickle=False)[:0])  # IndexError in the loader
    meta["counts"]["train"] = 0
    (sh / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IgptError, match="sh: no training images"):
        train(tiny(sh, tmp_path / "run2"))
    with pytest.raises(IgptError, match="--device meta: meta tensors hold no data"):
        train(tiny(shards, tmp_path / "run3", device="meta"))


def test_tokens_per_s_counts_training_time_only(shards, tmp_path, monkeypatch):
    """A clock that steps take 1 s of each and a checkpoint 1000 s (the one at step 3, inside the first logging
    interval): every logged tokens_per_s is exactly one batch of tokens per second. The pause neither counts
    (a rate near 0) nor drops the steps before it from the time while keeping their tokens (2x: the old bug)."""
    import types

    clock = [0.0]
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=T.time.monotonic))
    batch_at, save = BatchStream.batch_at, T._save

    def timed_batch(self, *a, **kw):
        clock[0] += 1.0
        return batch_at(self, *a, **kw)

    def slow_save(*a, **kw):
        clock[0] += 1000.0 if a[6] == 3 else 0.0  # a[6]: the step being saved
        return save(*a, **kw)

    monkeypatch.setattr(BatchStream, "batch_at", timed_batch)
    monkeypatch.setattr(T, "_save", slow_save)
    train(tiny(shards, tmp_path / "run", steps=12, log_every=6, save_every=3))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    assert len(rates) == 2 and rates == pytest.approx([8 * 64] * 2)  # batch 8 x 8x8 pixels per 1-s step


@pytest.mark.parametrize("objective, augment", [("ar", False), ("bert", True)])
def test_run_directory_and_learning(shards, tmp_path, objective, augment):
    out = tmp_path / "run"
    res = train(tiny(shards, out, objective=objective, augment=augment, steps=12, save_every=4, keep=2,
                     eval_every=6, micro_batch_size=4))
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "loss.png", "checkpoints"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["mode"] == objective and cfg["accumulation"] == 2 and cfg["model"]["n_px"] == 8
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens_per_s", "tokens"} <= set(r) for r in train_rows)
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [6, 12] and val_rows[-1]["best_val_loss"] == min(res["val"].values())
    assert abs(val_rows[0]["val_bits"] - val_rows[0]["val_loss"] / np.log(2)) < 1e-12
    ck = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ck == ["latest", "step-000008", "step-000012"]  # keep 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000012"
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]


def test_bert_loss_is_the_global_batch_mean_whatever_the_micro_batches(shards, tmp_path):
    """Each micro-batch's BERT loss (a mean over its images with a masked pixel) weighed 1 / accum however many
    such images it had: at a low mask rate a micro-batch with none added a loss of 0 and halved the step's mean
    (2.04 against 1.02 nats; so 2 ranks trained apart from 1). Now weighed by its share of those images."""
    runs = {}
    for micro in (None, 2):
        out = tmp_path / f"m{micro}"
        runs[micro] = train(tiny(shards, out, objective="bert", bert_mask_prob=0.02, micro_batch_size=micro,
                                 save_every=6))
    a, b = runs[None], runs[2]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-6)
    for (name, p), q in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_validation_under_several_ranks_scores_every_image_with_equal_passes(shards, monkeypatch, objective):
    """Each rank scored n // W images, so n % W of the asked-for images were silently dropped (33 images on 2
    ranks scored 32). Shares now differ by one image at most, and every rank runs the same number of forward
    passes (FSDP's forward is collective), the extra ones at weight 0."""
    import contextlib

    from igpt.distributed import DistInfo
    from igpt.model import ImageGPT
    from igpt.shards import load_shards

    sh = load_shards(shards)
    cfg = tiny(shards, "unused", objective=objective, eval_images=11)
    mcfg = T.resolve_model_config(cfg, sh.meta)
    model = ImageGPT(mcfg)
    val = sh.tokens("val")
    one = T.evaluate(model, val, mcfg, cfg, 2, torch.device("cpu"), contextlib.nullcontext)
    # the images are spread over the split (its first rows are a few classes of a class-ordered source)
    rows = T.eval_rows(len(val), 11)
    assert rows[0] == 0 and rows[-1] == len(val) - 1 and (np.diff(rows) > 0).all()
    if objective == "ar":
        from igpt.evaluate import nll

        assert one == pytest.approx(nll(model, val[rows]), rel=1e-6)
    sums, passes = [], []
    forward = ImageGPT.forward
    for r in range(3):
        calls = []
        monkeypatch.setattr(ImageGPT, "forward", lambda self, *a, _c=calls, **k: _c.append(1) or forward(self, *a, **k))
        monkeypatch.setattr(T.D, "get_dist_info", lambda r=r: DistInfo(r, r, 3))
        monkeypatch.setattr(T.D, "all_reduce_sum", lambda t: sums.append(t.clone()) or t)
        T.evaluate(model, val, mcfg, cfg, 2, torch.device("cpu"), contextlib.nullcontext)
        passes.append(len(calls))
    total = sum(sums)
    masks = torch.rand(11, val.shape[1], generator=torch.Generator().manual_seed(cfg.seed + 7919)) < 0.15
    # every image once (11 = 4 + 4 + 3: the old split scored 9); BERT: those with a masked pixel
    assert total[1].item() == (11 if objective == "ar" else int(masks.any(1).sum()))
    assert (total[0] / total[1]).item() == pytest.approx(one, rel=1e-6)
    assert passes == [2, 2, 2]


def test_tensorboard_purges_what_an_interrupted_process_logged_after_its_checkpoint(shards, tmp_path, monkeypatch):
    """metrics.jsonl drops the rows after the resumed step; the TensorBoard writer got no purge_step, so those
    steps appeared twice. (tensorboard is an optional extra, absent here: a recording stand-in for its
    SummaryWriter.)"""
    import sys
    import types

    made = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            made.append(purge_step)

        def add_scalar(self, *a, **k):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(tiny(shards, tmp_path / "run", stop_at=3))
    train(tiny(shards, tmp_path / "run", resume="auto"))
    assert made == [1, 4]


def test_existing_foreign_folder_is_not_replaced(shards, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("x")
    with pytest.raises(IgptError, match="did not write"):
        train(tiny(shards, tmp_path / "run"))
    proj = tmp_path / "proj"  # a user's config.json with a "train" section marked the folder as a run of ours
    proj.mkdir()
    (proj / "config.json").write_text('{"train": {"epochs": 90}, "model": "resnet50"}')
    with pytest.raises(IgptError, match="did not write"):
        train(tiny(shards, proj))
    assert (proj / "config.json").read_text() == '{"train": {"epochs": 90}, "model": "resnet50"}'


def test_a_run_killed_during_its_first_config_write_can_start_again(shards, tmp_path):
    """SIGKILL between atomic_write_bytes' mkstemp and its rename leaves only '.config.json.XXXX.tmp' in the run
    folder (bench/faults.py hit this with a kill 0.36 s in): that folder is ours, so the next run proceeds.
    A foreign temporary name is still refused."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".config.json.k3j2abcd.tmp").write_bytes(b"{")
    train(tiny(shards, tmp_path / "run"))
    assert (tmp_path / "run" / "config.json").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".notes.txt.k3j2abcd.tmp").write_bytes(b"x")
    with pytest.raises(IgptError, match="did not write"):
        train(tiny(shards, tmp_path / "other"))


def test_time_limit_stops_with_a_checkpoint_keeps_the_schedule_and_resumes(shards, tmp_path, capsys):
    """A time limit already spent stops the loop after its first step, checkpointing it (the lr of that step is
    the full schedule's); a resumed run with another limit (bookkeeping, allowed to change) trains to the end."""
    res = train(tiny(shards, tmp_path / "run", time_limit=1e-9))
    assert res["step"] == 1 and list(res["losses"]) == [1]
    assert res["checkpoint"].name == "step-000001" and latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert "time limit of 1e-09 s reached: stopping at step 1 of 6" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [pytest.approx(T.lr_at(0, 3e-3, 2, 6))]
    res = train(tiny(shards, tmp_path / "run", time_limit=3600.0, resume="auto"))
    assert res["step"] == 6 and sorted(res["losses"]) == [2, 3, 4, 5, 6]
    # run again when already at the end (e.g. a script killed after training): nothing trains, and the
    # checkpoint it resumed from is returned (it was None, which broke bench/quality.py's rerun)
    res = train(tiny(shards, tmp_path / "run", resume="auto"))
    assert res["losses"] == {} and res["step"] == 6 and res["checkpoint"].name == "step-000006"


def test_a_new_run_removes_what_a_killed_write_left_and_nothing_else(shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".config.json.k1l2.tmp", out / ".loss.png.a9b8.tmp", out / ".metrics.jsonl.zz.tmp"]
    kept = [out / ".notes.txt.x.tmp", out / "config.json.tmp", out / "mine.tmp"]
    for p in stale + kept:
        p.write_text("half")
    train(tiny(shards, out, steps=2, save_every=2))
    assert not any(p.exists() for p in stale) and all(p.read_text() == "half" for p in kept)
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 2


def test_a_numbered_device_under_torchrun_is_refused():
    """--device cuda:1 with several torchrun processes would put every rank on one GPU: refused by name (the
    device need not exist: the check comes first); 'cuda' takes each rank's LOCAL_RANK, and cpu stays allowed."""
    from igpt.distributed import DistInfo, pick_device

    for name in ("cuda:1", "cuda:0"):
        with pytest.raises(IgptError, match=f"--device {name}: under torchrun \\(2 processes\\)"):
            pick_device(name, DistInfo(rank=1, local_rank=1, world_size=2))
    assert pick_device("cpu", DistInfo(rank=1, local_rank=1, world_size=2)) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(IgptError, match="not usable on this machine"):  # one process: an index is fine
            pick_device("cuda:1", DistInfo(rank=0, local_rank=0, world_size=1))


def test_adamw_is_fused_on_cpu_and_cuda_but_not_over_sharded_parameters():
    assert T.fused_adamw(torch.device("cpu")) is True and T.fused_adamw(torch.device("cuda")) is True
    assert T.fused_adamw(torch.device("cpu"), sharded=True) is None  # FSDP2's DTensors: torch's default
    assert T.fused_adamw(torch.device("meta")) is None


def test_a_resumed_optimizer_uses_this_runs_fused_choice(shards, tmp_path, monkeypatch):
    """Loading the optimizer state restored the saving run's `fused` flag: a one-rank (fused) checkpoint resumed
    under FSDP2 ran the fused update over sharded DTensors, which fused_adamw(sharded=True) avoids."""
    train(tiny(shards, tmp_path / "run", stop_at=3))
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *a, **k):
        seen.append(self.param_groups[0]["fused"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    monkeypatch.setattr(T, "fused_adamw", lambda device, sharded=False: None)  # as a sharded resume chooses
    train(tiny(shards, tmp_path / "run", resume="auto"))
    assert seen and set(seen) == {None}


def test_token_ids_outside_the_palette_are_refused_wherever_shards_are_read(shards, tmp_path):
    """A damaged tokens file (or one of a larger palette) holding the id k (the start token's) or more: training,
    evaluation and feature extraction stop with one line instead of reading it as SOS or past the table."""
    import shutil

    from igpt.evaluate import nll
    from igpt.features import extract_features
    from igpt.shards import load_shards

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    for split in ("train", "val"):
        t = np.load(bad / f"{split}_tokens.npy", mmap_mode="r+")
        t[0, 5] = 8  # the palette has 8 colours: ids 0..7
        t.flush()
        del t
    with pytest.raises(IgptError, match="token id 8 in the shards is not a palette id"):
        train(tiny(bad, tmp_path / "run", batch_size=len(load_shards(bad).tokens("train"))))
    model = T.ImageGPT(T.resolve_model_config(tiny(bad, tmp_path / "x"), load_shards(bad).meta))
    val = load_shards(bad).tokens("val")
    for read in (lambda: nll(model, val), lambda: extract_features(model, val, [1])):
        with pytest.raises(IgptError, match="not a palette id"):
            read()
