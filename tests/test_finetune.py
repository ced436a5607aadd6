"""Fine-tuning: both objectives learn on a tiny set, lambda = 0 leaves L_gen out, early stopping chooses on val
only, BERT mask ensembles are seeded, the saved checkpoint carries the head, and bad input fails clearly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from igpt_testutil import tiny_model
from torch import nn

import igpt.finetune as ft
from igpt.checkpoint import load_heads, load_model, save_model
from igpt.errors import IgptError
from igpt.finetune import EarlyStopping, FinetuneConfig, finetune, joint_loss
from igpt.model import ar_inputs, bert_mask
from igpt.shards import load_shards

FAST = dict(steps=12, batch_size=16, eval_every=4, lr=3e-3, eval_batch_size=512)


def checkpoint(tmp_path, shards, mode="ar", seed=0):
    return str(save_model(tmp_path / f"ck_{mode}", tiny_model(seed, n_px=8, palette_size=8, mode=mode),
                          load_shards(shards).palette))


def batch(shards, n=32):
    s = load_shards(shards)
    return torch.from_numpy(s.tokens("train")[:n].astype(np.int64)), torch.from_numpy(s.labels("train")[:n])


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_both_objectives_reduce_their_losses_on_a_tiny_set(shards, lam):
    torch.manual_seed(0)
    model = tiny_model(n_px=8, palette_size=8).train()
    head = nn.Linear(24, 10, bias=False)
    px, y = batch(shards)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2, betas=(0.9, 0.95))
    first = None
    for _ in range(25):
        loss, parts = joint_loss(model, head, px, y, lambda_gen=lam)
        first = first or parts
        loss.backward()
        if lam == 0:
            assert model.lm_head.weight.grad is None and parts["gen"] is None  # L_gen left out entirely
            assert parts["loss"] == parts["clf"]
        else:
            assert model.lm_head.weight.grad.abs().sum() > 0
            assert parts["loss"] == pytest.approx(parts["clf"] + parts["gen"], rel=1e-5)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert parts["clf"] < 0.7 * first["clf"]
    if lam:
        assert parts["gen"] < first["gen"] and parts["loss"] < first["loss"]


def test_head_reads_the_final_normalised_features_in_one_pass(shards):
    model = tiny_model(n_px=8, palette_size=8).eval()
    head = nn.Linear(24, 10, bias=False)
    px, y = batch(shards, 8)
    with torch.no_grad():
        logits, gen = ft.joint_forward(model, head, px)
        feats = model.features(ar_inputs(px, model.config.sos_id), [2])[2]
        assert torch.allclose(logits, head(feats), atol=1e-5)
        from igpt.train import micro_loss
        assert gen.item() == pytest.approx(micro_loss(model, px, None, model.config).item(), rel=1e-5)
        bert = tiny_model(n_px=8, palette_size=8, mode="bert").eval()
        m = bert_mask((8, 64), torch.Generator().manual_seed(0))
        logits, gen = ft.joint_forward(bert, head, px, m)
        assert torch.allclose(logits, head(bert.features(px, [2], mask=m)[2]), atol=1e-5)
        assert gen.item() == pytest.approx(micro_loss(bert, px, m, bert.config).item(), rel=1e-5)


def test_early_stopping_rule():
    s = EarlyStopping(patience=2)
    assert s.update(1, 0.2) and not s.update(2, 0.2)  # a tie keeps the earlier step
    assert s.update(3, 0.3) and s.best_step == 3 and not s.should_stop
    s.update(4, 0.1)
    s.update(5, 0.25)
    assert s.should_stop and s.best == 0.3 and s.best_step == 3
    never = EarlyStopping(patience=0)
    for i in range(10):
        never.update(i, 0.0)
    assert not never.should_stop and never.best_step == 0


def test_finetune_keeps_the_best_val_step_and_reports_test_there(tmp_path, shards, monkeypatch):
    n_val = len(load_shards(shards).labels("val"))
    script = iter([0.1, 0.3, 0.2, 0.25, 0.9])  # val accuracies at steps 4, 8, 12, 16 (then stop), never 20
    heads_seen, test_calls = {}, []
    real_accuracy, real_proba = ft.accuracy, ft.predict_proba

    def proba(model, head, tokens, *a, **kw):
        heads_seen[len(heads_seen)] = head.weight.detach().clone()
        return real_proba(model, head, tokens, *a, **kw)

    def acc(probs, labels):
        if len(labels) == n_val:
            return next(script)
        test_calls.append(len(labels))
        return real_accuracy(probs, labels)

    monkeypatch.setattr(ft, "predict_proba", proba)
    monkeypatch.setattr(ft, "accuracy", acc)
    res = finetune(FinetuneConfig(checkpoint(tmp_path, shards), str(shards), str(tmp_path / "o"),
                                  **{**FAST, "steps": 20, "patience": 2}))
    assert [h["step"] for h in res["history"]] == [4, 8, 12, 16]
    assert res["best_step"] == 8 and res["val_accuracy"] == 0.3
    assert res["steps_run"] == 16 and res["stopped_early"]
    assert len(test_calls) == 1  # test scored once, after the choice
    assert torch.equal(res["head"].weight, heads_seen[1])  # the weights of step 8, not of the last step
    saved = load_heads(tmp_path / "o" / "checkpoint")["score"]
    assert torch.equal(saved, heads_seen[1]) and saved.shape == (10, 24)


def test_finetune_end_to_end_checkpoint_and_blind_to_test_labels(tmp_path, shards):
    ck = checkpoint(tmp_path, shards)
    res = finetune(FinetuneConfig(ck, str(shards), str(tmp_path / "a"), **FAST))
    vals = [h["val_accuracy"] for h in res["history"]]
    assert res["best_step"] == res["history"][int(np.argmax(vals))]["step"] and res["val_accuracy"] == max(vals)
    assert res["train"][-1]["clf"] < res["train"][0]["clf"]
    saved = (tmp_path / "a" / "finetune.json").read_text()
    assert '"test_accuracy"' in saved and '"history"' in saved
    model, palette = load_model(tmp_path / "a" / "checkpoint")
    score = load_heads(tmp_path / "a" / "checkpoint")["score"]
    assert score.shape == (10, model.config.n_embd) and palette.k == 8
    head = nn.Linear(24, 10, bias=False)
    head.weight.data = score
    s = load_shards(shards)
    for split, key in (("val", "val_accuracy"), ("test", "test_accuracy")):  # the saved weights are the best ones
        assert ft.accuracy(ft.predict_proba(model, head, s.tokens(split)), s.labels(split)) == res[key]
    poisoned = tmp_path / "poisoned"
    shutil.copytree(shards, poisoned)
    np.save(poisoned / "test_labels.npy", (s.labels("test") + 1) % 10)
    res2 = finetune(FinetuneConfig(ck, str(poisoned), str(tmp_path / "b"), **FAST))
    assert res2["history"] == res["history"] and res2["best_step"] == res["best_step"]
    assert res2["test_accuracy"] != res["test_accuracy"]


def test_bert_mask_ensemble_is_seeded_and_averages(tmp_path, shards):
    ck = checkpoint(tmp_path, shards, "bert")
    cfg = dict(**{**FAST, "steps": 4, "eval_every": 2}, mask_ensemble=3, seed=5)
    a = finetune(FinetuneConfig(ck, str(shards), str(tmp_path / "a"), **cfg))
    b = finetune(FinetuneConfig(ck, str(shards), str(tmp_path / "b"), **cfg))
    assert a["history"] == b["history"] and a["test_accuracy"] == b["test_accuracy"]
    assert "averaged over 3" in a["evaluation"]
    tokens = load_shards(shards).tokens("val")[:40]
    masks = ft.eval_masks(40, 64, 3, 0.15, seed=5, split="val")
    assert not torch.equal(masks[0], masks[1])
    assert all(torch.equal(a, b) for a, b in zip(masks, ft.eval_masks(40, 64, 3, 0.15, seed=5, split="val")))
    test_masks = ft.eval_masks(40, 64, 3, 0.15, seed=5, split="test")  # val's and test's rows were masked alike
    assert not any(torch.equal(a, b) for a, b in zip(masks, test_masks))
    p3 = ft.predict_proba(a["model"], a["head"], tokens, masks)
    singles = [ft.predict_proba(a["model"], a["head"], tokens, [m]) for m in masks]
    assert np.allclose(p3, np.mean(singles, axis=0)) and not np.allclose(singles[0], singles[1])


def test_config_and_data_errors(tmp_path, shards):
    for kw, field in [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"lambda_gen": -1.0}, "lambda_gen"),
                      ({"mask_ensemble": 0}, "mask_ensemble"), ({"patience": -1}, "patience"),
                      ({"bert_mask_prob": 1.5}, "bert_mask_prob"), ({"batch_size": True}, "batch_size")]:
        with pytest.raises(IgptError, match=f"finetune config: {field}"):
            FinetuneConfig("c", "d", "o", **kw)
    ck = checkpoint(tmp_path, shards)
    with pytest.raises(IgptError, match="BERT models only"):
        finetune(FinetuneConfig(ck, str(shards), str(tmp_path / "o"), mask_ensemble=5))
    unlabelled = tmp_path / "unlabelled"  # shards of an unlabelled source (prepare writes no label files)
    shutil.copytree(shards, unlabelled)
    for f in unlabelled.glob("*_labels.npy"):
        f.unlink()
    meta = json.loads((unlabelled / "meta.json").read_text())
    (unlabelled / "meta.json").write_text(json.dumps({**meta, "labels": False}))
    with pytest.raises(IgptError, match="unlabelled: train, val, test"):
        finetune(FinetuneConfig(ck, str(unlabelled), str(tmp_path / "o")))
    (unlabelled / "meta.json").write_text(json.dumps(meta))  # labelled shards missing a label file: damaged
    with pytest.raises(IgptError, match="train_labels.npy: unreadable"):
        finetune(FinetuneConfig(ck, str(unlabelled), str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
    empty = tmp_path / "empty-test"
    shutil.copytree(shards, empty)
    for kind in ("tokens", "labels", "pixels", "native"):
        f = empty / f"test_{kind}.npy"
        if f.is_file():
            np.save(f, np.load(f, allow_pickle=False)[:0])
    (empty / "meta.json").write_text(json.dumps({**meta, "counts": {**meta["counts"], "test": 0}}))
    with pytest.raises(IgptError, match="empty: test"):
        finetune(FinetuneConfig(ck, str(empty), str(tmp_path / "o")))
