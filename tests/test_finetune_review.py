"""Fine-tuning and the HF classification head with unusual input (found by a review in the fifteenth session)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from igpt_testutil import hf_model, tiny_model

import igpt.finetune as ft
from igpt.checkpoint import load_heads, load_model, save_model
from igpt.errors import IgptError
from igpt.finetune import FinetuneConfig, finetune
from igpt.shards import load_shards

FAST = dict(steps=4, batch_size=8, eval_every=2, lr=3e-3)


def small_shards(src, dst, counts, labels=None):
    """A copy of shard directory ``src`` keeping the first counts[split] images (labels: {split: new labels})."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    for s, n in counts.items():
        for kind in ("tokens", "labels", "pixels", "native"):
            f = dst / f"{s}_{kind}.npy"
            if f.is_file():
                np.save(f, np.load(f)[:n])
        if labels and s in labels:
            np.save(dst / f"{s}_labels.npy", np.asarray(labels[s], dtype=np.int64))
    (dst / "meta.json").write_text(json.dumps({**meta, "counts": dict(counts)}))
    return dst


@pytest.fixture
def small(tmp_path, shards):
    return small_shards(shards, tmp_path / "small", {"train": 40, "val": 10, "test": 10})


def ckpt(tmp_path, shards, mode="ar", dtype=torch.float32, name="ck"):
    model = tiny_model(0, n_px=8, palette_size=8, mode=mode).to(dtype)
    return str(save_model(tmp_path / name, model, load_shards(shards).palette))


# 1 -- a half-precision (or float64) checkpoint, which load_model keeps in its dtype, crashes fine-tuning
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_finetune_accepts_checkpoints_in_every_float_dtype(tmp_path, shards, small, dtype):
    res = finetune(FinetuneConfig(ckpt(tmp_path, shards, dtype=dtype), str(small), str(tmp_path / "o"), **FAST))
    assert 0.0 <= res["test_accuracy"] <= 1.0
    assert load_heads(tmp_path / "o" / "checkpoint")["score"].shape == (10, 24)


# 2 -- an integer score.weight is imported (and exported) as if it were weights
def test_import_hf_refuses_an_integer_score_head(tmp_path):
    from igpt.hf import load_hf

    clf = hf_model(8, 24, 2, 3, 16, seed=6, cls_name="ImageGPTForImageClassification", num_labels=5)
    clf.save_pretrained(tmp_path / "clf")
    (tmp_path / "clf" / "model.safetensors").unlink()
    torch.save({**clf.state_dict(), "score.weight": torch.randint(0, 3, (5, 24))},
               tmp_path / "clf" / "pytorch_model.bin")
    with pytest.raises(IgptError, match="score"):
        load_hf(tmp_path / "clf")


# 3 -- a huge train label sizes the head from it: a C++ allocation traceback instead of one line
def test_absurd_train_label_is_a_one_line_error(tmp_path, shards):
    y = np.zeros(8, np.int64)
    y[0] = 2**40
    data = small_shards(shards, tmp_path / "big", {"train": 8, "val": 4, "test": 4}, labels={"train": y})
    with pytest.raises(IgptError, match="label"):
        finetune(FinetuneConfig(ckpt(tmp_path, shards), str(data), str(tmp_path / "o"), steps=1))


# 4 -- OUT/finetune.json is only checked after training: the run is lost and a checkpoint is left without it
def test_unwritable_result_file_is_refused_before_training(tmp_path, shards, small, monkeypatch):
    out = tmp_path / "o"
    (out / "finetune.json").mkdir(parents=True)
    steps = []
    real = ft.joint_loss
    monkeypatch.setattr(ft, "joint_loss", lambda *a, **k: steps.append(1) or real(*a, **k))
    with pytest.raises(IgptError, match="finetune.json is a folder"):
        finetune(FinetuneConfig(ckpt(tmp_path, shards), str(small), str(out), **FAST))
    assert steps == [] and not (out / "checkpoint").exists()


# 5 -- killed between the two writes: the new checkpoint sits beside the previous run's finetune.json
def test_interrupted_rerun_leaves_no_mismatched_record(tmp_path, shards, small, monkeypatch):
    ck, out = ckpt(tmp_path, shards), tmp_path / "o"
    first = finetune(FinetuneConfig(ck, str(small), str(out), **FAST, seed=1))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(ck, str(small), str(out), **{**FAST, "steps": 6}, seed=2))
    record = out / "finetune.json"
    head = load_heads(out / "checkpoint")["score"]
    if record.exists():  # a record that is there must describe the checkpoint beside it
        assert json.loads(record.read_text())["config"]["seed"] == 1
        same = torch.equal(head, first["head"].weight.detach().cpu())
        assert same, "finetune.json is run 1's, the checkpoint beside it run 2's"


# 6 -- a divergence after the best step throws away the best model (minutes or hours of work)
def test_divergence_keeps_the_best_model_so_far(tmp_path, shards, small, monkeypatch):
    real = ft.joint_loss
    calls = []

    def diverging(*a, **k):
        loss, parts = real(*a, **k)
        calls.append(1)
        if len(calls) == 5:  # step 5, after validations at steps 2 and 4
            return loss * float("nan"), {**parts, "loss": float("nan")}
        return loss, parts

    monkeypatch.setattr(ft, "joint_loss", diverging)
    try:
        finetune(FinetuneConfig(ckpt(tmp_path, shards), str(small), str(tmp_path / "o"), **{**FAST, "steps": 8}))
    except IgptError:
        pass  # an error is fine, as long as the best weights and their scores are not lost
    assert (tmp_path / "o" / "checkpoint").is_dir() and (tmp_path / "o" / "finetune.json").is_file()
    res = json.loads((tmp_path / "o" / "finetune.json").read_text())
    assert res["best_step"] in (2, 4) and res["steps_run"] == 4
    model, _ = load_model(tmp_path / "o" / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())
