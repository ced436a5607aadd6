"""`igpt eval` and `igpt finetune` with unusual input (found by a review in the seventeenth session)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from igpt_testutil import tiny_model
from test_finetune_review import small_shards
from test_probe import write_shards

import igpt.evaluate as ev
import igpt.finetune as ft
from igpt.checkpoint import save_model
from igpt.errors import IgptError
from igpt.finetune import FinetuneConfig, finetune
from igpt.palette import Palette
from igpt.shards import load_shards

FAST = dict(steps=4, batch_size=8, eval_every=1, lr=3e-3)


@pytest.fixture
def small(tmp_path, shards):
    return small_shards(shards, tmp_path / "small", {"train": 40, "val": 10, "test": 10})


def ckpt(tmp_path, shards, name="ck"):
    return str(save_model(tmp_path / name, tiny_model(0, n_px=8, palette_size=8), load_shards(shards).palette))


# 1 -- eval scored the whole split, then found that its --out (or CHECKPOINT/eval.json) cannot be written
def test_eval_refuses_an_unwritable_result_before_scoring(tmp_path, monkeypatch):
    sh = write_shards(tmp_path / "sh", n_px=4, k=6)
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    scored = []
    real = ev.score
    monkeypatch.setattr(ev, "score", lambda *a, **k: scored.append(1) or real(*a, **k))
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "taken", tmp_path / "file" / "eval.json"):
        with pytest.raises(IgptError, match=str(out)):
            ev.evaluate(ev.EvalConfig(str(ck), str(sh), out=str(out)))
    assert scored == []  # refused before the (possibly hours-long) scoring, not after it
    res = ev.evaluate(ev.EvalConfig(str(ck), str(sh), out=str(tmp_path / "new" / "e.json")))
    assert json.loads((tmp_path / "new" / "e.json").read_text())["nats_per_token"] == res["nats_per_token"]


# 2 -- a validation whose class probabilities are NaN (the weights blew up) was scored as "every image is
# class 0" (numpy's argmax of NaNs), could become the best step, and its weights were kept and exported
def _nan_at_validation(monkeypatch, bad_calls: set[int]):
    real = ft.predict_proba
    calls = []

    def proba(*a, **k):
        p = real(*a, **k)
        calls.append(1)
        return np.full_like(p, np.nan) if len(calls) in bad_calls else p

    monkeypatch.setattr(ft, "predict_proba", proba)


def test_nan_predictions_at_the_first_validation_are_an_error(tmp_path, shards, small, monkeypatch):
    _nan_at_validation(monkeypatch, {1})
    with pytest.raises(IgptError, match="non-finite class probabilities on val at step 1"):
        finetune(FinetuneConfig(ckpt(tmp_path, shards), str(small), str(tmp_path / "o"), **FAST))
    assert not (tmp_path / "o" / "checkpoint").exists() and not (tmp_path / "o" / "finetune.json").exists()


def test_nan_predictions_after_a_best_step_keep_that_step(tmp_path, shards, small, monkeypatch):
    labels = np.load(small / "val_labels.npy")
    labels[:] = 0  # NaN rows read as class 0 would score 100% here and become the best step
    labels[0] = 1
    np.save(small / "val_labels.npy", labels)
    _nan_at_validation(monkeypatch, {3})
    with pytest.raises(IgptError, match="non-finite class probabilities on val at step 3"):
        finetune(FinetuneConfig(ckpt(tmp_path, shards), str(small), str(tmp_path / "o"), **FAST))
    res = json.loads((tmp_path / "o" / "finetune.json").read_text())
    assert res["best_step"] in (1, 2) and [h["step"] for h in res["history"]] == [1, 2]
    assert "non-finite class probabilities" in res["diverged"]


def test_accuracy_counts_rows_without_finite_probabilities_as_wrong():
    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8]])
    assert ft.accuracy(probs, np.array([0, 0, 1])) == pytest.approx(2 / 3)


# 3 -- a checkpoint whose loss is not finite before any update was blamed on the learning rate
def test_damaged_checkpoint_is_not_blamed_on_the_learning_rate(tmp_path, shards, small):
    model = tiny_model(0, n_px=8, palette_size=8)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    ck = save_model(tmp_path / "nan", model, load_shards(shards).palette)
    with pytest.raises(IgptError, match="before any update") as e:
        finetune(FinetuneConfig(str(ck), str(small), str(tmp_path / "o"), **FAST))
    assert "lower --lr" not in str(e.value)


# 4 -- an empty split said only "no images to evaluate", after loading the model, naming neither split nor data
def test_eval_of_an_empty_split_names_it(tmp_path, shards):
    empty = small_shards(shards, tmp_path / "empty", {"train": 40, "val": 10, "test": 0})
    with pytest.raises(IgptError, match=r"empty: the test split has no images"):
        ev.evaluate(ev.EvalConfig(ckpt(tmp_path, shards), str(empty)))
