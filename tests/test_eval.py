"""`igpt eval`: nats and bits per token; a model that predicts the marginal scores the marginal's entropy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from igpt_testutil import tiny_model
from test_probe import write_shards

from igpt.checkpoint import save_model
from igpt.errors import IgptError
from igpt.evaluate import EvalConfig, evaluate, nats_to_bits, nll, score
from igpt.palette import Palette
from igpt.shards import load_shards


def marginal_model(p: np.ndarray, **kw):
    """A tiny model whose logits are log p at every position, whatever the input: the blocks add nothing
    (zero output projections), the token embedding is zero and every position embedding is the same vector, so
    ln_f sees a constant u; lm_head = log p u^T / |u|^2 maps it to log p."""
    model = tiny_model(palette_size=len(p), **kw)
    with torch.no_grad():
        for blk in model.h:
            for lin in (blk.attn.c_proj, blk.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        model.wte.weight.zero_()
        model.wpe.weight.copy_(torch.linspace(-1, 1, model.config.n_embd).expand_as(model.wpe.weight))
        u = model.ln_f(model.wpe.weight[:1])[0]  # (d,)
        model.lm_head.weight.copy_(torch.outer(torch.log(torch.tensor(p, dtype=torch.float32)), u) / u.dot(u))
    return model


def test_marginal_model_scores_the_entropy(tmp_path):
    sh = load_shards(write_shards(tmp_path / "sh", n_px=4, k=6))
    tokens = np.asarray(sh.tokens("test"))
    p = np.bincount(tokens.ravel(), minlength=6) / tokens.size
    assert (p > 0).all()
    entropy = -(p * np.log(p)).sum()  # nats
    ck = save_model(tmp_path / "ck", marginal_model(p, n_px=4), sh.palette)
    res = evaluate(EvalConfig(str(ck), str(sh.root), out=str(tmp_path / "e.json"), batch_size=7))
    assert res["nats_per_token"] == pytest.approx(entropy, abs=1e-5)
    assert res["bits_per_token"] == pytest.approx(entropy / math.log(2), abs=1e-5)
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["nats_per_token"] == res["nats_per_token"] and saved["images"] == 60 and saved["mode"] == "ar"


def test_ar_nll_scores_the_first_pixel_from_sos():
    model = tiny_model(n_px=4, palette_size=6)
    tokens = np.random.default_rng(0).integers(0, 6, size=(5, 16)).astype(np.uint16)
    x = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.cat([torch.full((5, 1), 6), x[:, :-1]], 1)), -1)
    ref = -logp.gather(-1, x[..., None]).mean().item()
    assert nll(model, tokens, batch_size=2) == pytest.approx(ref, rel=1e-5)


def test_bert_nll_uses_a_fixed_seeded_mask():
    model = tiny_model(n_px=4, palette_size=6, mode="bert")
    tokens = np.random.default_rng(1).integers(0, 6, size=(6, 16)).astype(np.uint16)
    x = torch.from_numpy(tokens.astype(np.int64))
    mask = torch.rand(6, 16, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        ce = -torch.log_softmax(model(x, mask), -1).gather(-1, x[..., None])[..., 0]
    ref = ((ce * mask).sum(1) / mask.sum(1).clamp_min(1)).mean().item()
    assert nll(model, tokens, batch_size=4, mask_prob=0.5, seed=3) == pytest.approx(ref, rel=1e-5)
    assert nll(model, tokens, mask_prob=0.5, seed=3) == nll(model, tokens, mask_prob=0.5, seed=3)
    assert nll(model, tokens, mask_prob=0.5, seed=4) != nll(model, tokens, mask_prob=0.5, seed=3)


def test_bert_nll_leaves_out_images_without_a_masked_pixel():
    """At a low mask probability some images get no masked pixel: they have nothing to score and must not
    count as a loss of 0 (which biased the NLL low by their share), in any batching."""
    model = tiny_model(n_px=4, palette_size=6, mode="bert")
    tokens = np.random.default_rng(2).integers(0, 6, size=(40, 16)).astype(np.uint16)
    x = torch.from_numpy(tokens.astype(np.int64))
    mask = torch.rand(40, 16, generator=torch.Generator().manual_seed(5)) < 0.05
    has = mask.any(1)
    assert 5 <= int((~has).sum()) <= 35  # the case at hand: some images without a masked pixel
    with torch.no_grad():
        ce = -torch.log_softmax(model(x, mask), -1).gather(-1, x[..., None])[..., 0]
    ref = ((ce * mask).sum(1)[has] / mask.sum(1)[has]).mean().item()
    for bs in (3, 40):
        assert nll(model, tokens, batch_size=bs, mask_prob=0.05, seed=5) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(IgptError, match="no image got a masked pixel"):
        nll(model, tokens[:2], mask_prob=1e-9)
    assert score(model, tokens, mask_prob=0.05, seed=5)[1:] == (int(has.sum()), int(mask.sum()))


def test_eval_records_the_images_and_tokens_it_scored(tmp_path):
    """eval.json said "images": 60 for a BERT model that scored 16 of them (the others had no masked pixel)."""
    sh = write_shards(tmp_path / "sh", n_px=4, k=6)
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6, mode="bert"), Palette.load(sh / "palette.npy"))
    res = evaluate(EvalConfig(str(ck), str(sh), bert_mask_prob=0.02, out=str(tmp_path / "e.json")))
    mask = torch.rand(60, 16, generator=torch.Generator().manual_seed(0)) < 0.02
    assert res["images"] == 60 and res["images_scored"] == int(mask.any(1).sum()) < 60
    assert res["tokens_scored"] == int(mask.sum())


def test_mismatched_model_and_shards_are_user_errors(tmp_path):
    sh = write_shards(tmp_path / "sh", n_px=4, k=6)
    ck = save_model(tmp_path / "ck", tiny_model(n_px=8, palette_size=6))
    with pytest.raises(IgptError, match="model sees 8x8"):
        evaluate(EvalConfig(str(ck), str(sh)))
    ck2 = save_model(tmp_path / "ck2", tiny_model(n_px=4, palette_size=6), Palette(np.linspace(-1, 0.5, 6)[:, None]))
    with pytest.raises(IgptError, match="another palette"):
        evaluate(EvalConfig(str(ck2), str(sh)))
    with pytest.raises(IgptError, match="batch_size"):
        EvalConfig("c", "d", batch_size=0)
    model = tiny_model(n_px=4, palette_size=6)  # NaN weights printed "nan nats/token" with exit status 0
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    ck3 = save_model(tmp_path / "ck3", model, Palette.load(sh / "palette.npy"))
    with pytest.raises(IgptError, match="ck3: the negative log-likelihood is nan"):
        evaluate(EvalConfig(str(ck3), str(sh)))


def test_nats_to_bits():
    assert nats_to_bits(math.log(2)) == pytest.approx(1.0)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_of_a_process_group_scores_every_world_size_th_batch(monkeypatch, rank):
    """Under a process group of 2 (its collective replaced by a no-op, so each rank's own sums come back) rank r
    of a shared score takes batches r, r + 2, ...: its images are those batches' and its mean is theirs."""
    import torch.distributed as dist

    model = tiny_model(n_px=4, palette_size=6)
    tokens = np.random.default_rng(0).integers(0, 6, size=(11, 16)).astype(np.uint16)  # batches of 3: 0-2 .. 9-10
    mine = np.concatenate([tokens[i:i + 3] for i in range(3 * rank, 11, 6)])
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: None)
    assert score(model, tokens, batch_size=3)[1] == 11  # not shared unless asked: every batch, no collective
    nats, images, _ = score(model, tokens, batch_size=3, shared=True)
    monkeypatch.undo()
    assert images == len(mine) == (6 if rank == 0 else 5)
    assert nats == pytest.approx(nll(model, mine, batch_size=3), rel=1e-12)
