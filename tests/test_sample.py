"""Sampling and PNG grids: greedy, prefixes, filters, seeds, grids (the decoder itself: test_decode.py)."""

import json

import numpy as np
import pytest
import torch
from igpt_testutil import grey_palette, rgb_palette, tiny_config, tiny_model
from PIL import Image

from igpt.checkpoint import save_model
from igpt.decode import Decoder
from igpt.errors import IgptError
from igpt.model import ImageGPT, ar_inputs
from igpt.palette import Palette
from igpt.sample import filter_logits, generate, image_grid, pick_tokens, sample_to_grid


def _greedy_without_cache(m: ImageGPT, prefix: torch.Tensor) -> torch.Tensor:
    seq = torch.cat([torch.full((len(prefix), 1), m.config.sos_id), prefix], 1)
    with torch.no_grad():
        while seq.shape[1] <= m.config.seq_len:
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, 1:]


@pytest.mark.parametrize("p", [0, 20])
def test_greedy_with_cache_equals_greedy_without(p):
    m = tiny_model(seed=2)
    prefix = torch.randint(0, 16, (4, p))
    got = generate(m, 4, prefix=prefix if p else None, top_k=1, batch_size=3)  # two batches: 3 + 1
    assert torch.equal(got, _greedy_without_cache(m, prefix))


def test_prefix_is_never_changed_and_seeds_reproduce():
    m = tiny_model(seed=3)
    prefix = torch.randint(0, 16, (5, 30))
    a = generate(m, 5, prefix=prefix, seed=7, temperature=1.5)
    assert a.shape == (5, 64) and a.dtype == torch.long
    assert torch.equal(a[:, :30], prefix)
    assert torch.equal(a, generate(m, 5, prefix=prefix, seed=7, temperature=1.5))
    assert not torch.equal(a, generate(m, 5, prefix=prefix, seed=8, temperature=1.5))
    assert a.min() >= 0 and a.max() < 16  # never SOS


def test_filters_keep_only_the_allowed_set():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(6, 50, generator=g) * 3
        probs = torch.softmax(logits, -1)
        k_out = filter_logits(logits.clone(), top_k=5)
        top5 = torch.topk(logits, 5).indices
        assert torch.equal(torch.isfinite(k_out).sum(1), torch.full((6,), 5))
        assert all(set(torch.nonzero(torch.isfinite(k_out[i])).flatten().tolist()) == set(top5[i].tolist())
                   for i in range(6))
        p_out = filter_logits(logits.clone(), top_p=0.8)
        for i in range(6):  # smallest set of most likely tokens with mass >= 0.8
            order = probs[i].argsort(descending=True)
            need = int((probs[i][order].cumsum(0) < 0.8).sum()) + 1
            assert set(torch.nonzero(torch.isfinite(p_out[i])).flatten().tolist()) == set(order[:need].tolist())
    lg = torch.randn(4, 30)
    assert torch.equal(pick_tokens(lg.clone(), torch.empty(4, 1), g, top_k=1), lg.argmax(-1))
    assert torch.isfinite(filter_logits(torch.randn(4, 30), top_p=1e-9)).sum() == 4  # always one token


def test_sampling_never_picks_an_excluded_token():
    logits = torch.full((5000, 10), float("-inf"))
    logits[:, 3], logits[:, 7], logits[:, 9] = 0.0, 1.0, -20.0
    toks = pick_tokens(logits.clone(), torch.empty(5000, 1), torch.Generator().manual_seed(1))
    assert set(toks.tolist()) <= {3, 7, 9} and {3, 7} <= set(toks.tolist())


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    toks = pick_tokens(logits.clone(), torch.empty(len(logits), 1), g, temperature=2.0)
    freq = torch.bincount(toks, minlength=5).float() / len(toks)
    assert (freq - torch.softmax(logits[0] / 2.0, -1)).abs().max() < 0.015


def test_end_to_end_top_k_and_top_p_emit_only_allowed_tokens():
    m = tiny_model(seed=4)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # peaked distributions, so the filters actually cut something
    for kw in (dict(top_k=3), dict(top_p=0.5)):
        out = generate(m, 6, seed=1, **kw)
        with torch.no_grad():
            logits = m(ar_inputs(out, 16))
        allowed = torch.isfinite(filter_logits(logits.flatten(0, 1).clone(), **kw)).view(6, 64, 16)
        assert allowed.gather(-1, out[..., None]).all(), kw


def test_bad_arguments():
    m = tiny_model()
    with pytest.raises(IgptError, match="temperature"):
        generate(m, 2, temperature=0.0)
    with pytest.raises(IgptError, match="top-k"):
        generate(m, 2, top_k=0)
    with pytest.raises(IgptError, match="top-p"):
        generate(m, 2, top_p=1.5)
    with pytest.raises(IgptError, match="prefix"):
        generate(m, 2, prefix=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(IgptError, match="bert"):
        generate(tiny_model(mode="bert"), 2)


def test_image_grid_layout():
    a = np.zeros((2, 3, 3), np.uint8)
    grid = image_grid([[a, None], [a, a]], scale=2, pad=1)
    assert grid.shape == (2 * (4 + 1) + 1, 2 * (6 + 1) + 1, 3)
    assert grid[1:5, 1:7].max() == 0 and grid[1:5, 8:14].min() == 255  # the blank cell stays white


def _shards(path, toks, split="test", n_px=8, k=16):
    """A shard directory as `igpt prepare` lays it out (see igpt.prepare), with one split."""
    path.mkdir()
    pal = Palette(grey_palette(k))
    pal.save(path / "palette.npy")
    np.save(path / f"{split}_tokens.npy", toks.astype(np.uint16))
    meta = {"format": "igpt-shards", "version": 1, "n_px": n_px, "channels": 1, "palette_size": k,
            "palette_sha256": pal.hash, "counts": {split: len(toks)}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_sample_to_grid_unconditional(tmp_path):
    save_model(tmp_path / "ck", tiny_model(seed=5), palette=rgb_palette(16))
    ids = sample_to_grid(tmp_path / "ck", 5, tmp_path / "g.png", seed=3, top_k=4, tokens_out=tmp_path / "t.npy")
    saved = np.load(tmp_path / "t.npy")
    assert saved.dtype == np.uint16 and saved.shape == (5, 64) and np.array_equal(saved, ids)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape == (2 * (128 + 2) + 2, 3 * (128 + 2) + 2, 3)  # 3 x 2 cells, 8 px scaled 16x
    again = sample_to_grid(tmp_path / "ck", 5, tmp_path / "g2.png", seed=3, top_k=4)
    assert np.array_equal(ids, again)


def test_sample_to_grid_completion_keeps_the_top_rows(tmp_path):
    save_model(tmp_path / "ck", tiny_model(seed=6))  # no palette: the shards' one is used
    toks = np.random.default_rng(0).integers(0, 16, (4, 64))
    shards = _shards(tmp_path / "sh", toks, split="val")  # no test split: falls back to val
    ids = sample_to_grid(tmp_path / "ck", 6, tmp_path / "c.png", complete_from=shards, rows=3, seed=1,
                         per_image=3)
    assert ids.shape == (6, 64)
    assert np.array_equal(ids[:3, :24], np.repeat(toks[:1, :24], 3, 0))
    assert np.array_equal(ids[3:, :24], np.repeat(toks[1:2, :24], 3, 0))
    img = np.asarray(Image.open(tmp_path / "c.png"))
    assert img.ndim == 2 and img.shape == (2 * 130 + 2, 5 * 130 + 2)  # grey; original | top | 3 completions
    with pytest.raises(IgptError, match="rows"):
        sample_to_grid(tmp_path / "ck", 2, tmp_path / "c.png", complete_from=shards, rows=8)
    with pytest.raises(IgptError, match="complete-from"):
        sample_to_grid(tmp_path / "ck", 2, tmp_path / "c.png", rows=2)
    with pytest.raises(IgptError, match="palette"):
        sample_to_grid(tmp_path / "ck", 2, tmp_path / "c.png")


def test_sample_to_grid_refuses_a_zero_head_and_mismatched_shards(tmp_path):
    save_model(tmp_path / "ck", ImageGPT(tiny_config()), palette=rgb_palette(16))
    with pytest.raises(IgptError, match="all zeros"):
        sample_to_grid(tmp_path / "ck", 2, tmp_path / "g.png")
    save_model(tmp_path / "ck2", tiny_model(), palette=rgb_palette(16))
    shards = _shards(tmp_path / "sh", np.zeros((2, 256)), n_px=16)
    with pytest.raises(IgptError, match="16px"):
        sample_to_grid(tmp_path / "ck2", 2, tmp_path / "g.png", complete_from=shards)
    # same size and colour count, other colours: the ids would mean other colours to the model
    shards = _shards(tmp_path / "sh-grey", np.zeros((2, 64)))
    with pytest.raises(IgptError, match="another palette"):
        sample_to_grid(tmp_path / "ck2", 2, tmp_path / "g.png", complete_from=shards)
    with pytest.raises(IgptError, match="--device 'nope'"):
        sample_to_grid(tmp_path / "ck2", 2, tmp_path / "g.png", device="nope")


def test_generate_checks_its_prefix():
    m = tiny_model()
    for prefix, message in [(torch.zeros(8, dtype=torch.long), "prefix must be"),
                            (torch.full((2, 4), 16), r"palette ids in \[0, 16\)"),  # SOS is not a pixel
                            (torch.full((2, 4), -1), r"palette ids in \[0, 16\)"),
                            (torch.zeros(2, 4), "integer palette ids")]:
        with pytest.raises(IgptError, match=message):
            generate(m, 2, prefix=prefix)
    with pytest.raises(IgptError, match="seed must be"):
        generate(m, 1, seed=-1)


def test_a_tiny_temperature_is_greedy():
    """logits / T overflows for a tiny T; the row maximum is subtracted first, so the pick is the argmax."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.0]])
    u = torch.empty(2, 1)
    for t in (1e-38, 1e-6):
        picks = pick_tokens(logits.clone(), u, torch.Generator().manual_seed(0), temperature=t)
        assert picks.tolist() == [1, 0]


@pytest.mark.parametrize("top_k", [None, 1])
def test_non_finite_logits_are_an_error_not_the_last_colour(tmp_path, top_k):
    """NaN weights gave NaN logits, whose NaN cdf made searchsorted return K, clamped to the last id: a grid of
    one colour and exit 0. The rows are now flagged on the device and checked once per batch."""
    m = tiny_model(seed=1)
    with torch.no_grad():
        m.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(IgptError, match="non-finite logits .* for 3 of 3 images"):
        generate(m, 3, top_k=top_k)
    bad = torch.zeros(2, dtype=torch.bool)
    logits = torch.tensor([[0.0, float("inf"), 1.0], [0.0, 1.0, 2.0]])
    pick_tokens(logits, torch.empty(2, 1), torch.Generator().manual_seed(0), bad=bad)
    assert bad.tolist() == [True, False]


def test_sample_arguments_and_outputs_are_checked_before_sampling(tmp_path, monkeypatch):
    """--per-image 0 was turned into 1; an --n far beyond memory ended in an allocator traceback (or an
    overflow); an unwritable --tokens-out failed after sampling, the PNG already replaced; --device cpu:1
    loaded nothing and was reported as a corrupt checkpoint; a uint16 prefix (the shards' dtype) crashed."""
    import igpt.sample as S

    save_model(tmp_path / "ck", tiny_model(seed=5), palette=rgb_palette(16))
    shards = _shards(tmp_path / "sh", np.random.default_rng(0).integers(0, 16, (4, 64)))
    with pytest.raises(IgptError, match="--per-image must be >= 1, got 0"):
        sample_to_grid(tmp_path / "ck", 4, tmp_path / "g.png", complete_from=shards, per_image=0)
    for n in (10**8, 10**20):
        with pytest.raises(IgptError, match=f"--n {n}: the ids and the PNG grid need about .* GiB, more than"):
            sample_to_grid(tmp_path / "ck", n, tmp_path / "g.png")
    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("sampled before checking the outputs"))
    (tmp_path / "g.png").write_bytes(b"old")
    (tmp_path / "a_file").write_text("x")
    for bad, message in ((tmp_path / "a_file" / "t.npy", "t.npy: cannot write there"),
                         (tmp_path, "is a folder")):
        with pytest.raises(IgptError, match=message):
            sample_to_grid(tmp_path / "ck", 4, tmp_path / "g.png", tokens_out=bad)
    assert (tmp_path / "g.png").read_bytes() == b"old"
    with pytest.raises(IgptError, match="--device cpu:1: the CPU has no numbered devices"):
        sample_to_grid(tmp_path / "ck", 2, tmp_path / "g.png", device="cpu:1")
    monkeypatch.undo()
    ids = generate(tiny_model(), 2, prefix=torch.zeros(2, 8, dtype=torch.uint16), top_k=1)
    assert ids.shape == (2, 64) and (ids[:, :8] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoding_and_sampling(tmp_path):
    m = tiny_model(seed=1, n_px=8, n_embd=36, n_head=6).cuda()
    idx = ar_inputs(torch.randint(0, 16, (3, 64)), 16).cuda()
    with torch.no_grad():
        full = m(idx)
    dec = Decoder(m, 3)
    assert (dec.prefill(idx[:, :9]) - full[:, 8]).abs().max() <= 1e-5
    for t in range(9, 64):
        assert (dec.step(idx[:, t]) - full[:, t]).abs().max() <= 1e-5
    prefix = torch.randint(0, 16, (4, 16))
    a = generate(m, 4, prefix=prefix, seed=3, top_k=5, top_p=0.9)
    assert torch.equal(a[:, :16], prefix) and torch.equal(a, generate(m, 4, prefix=prefix, seed=3, top_k=5, top_p=0.9))
    assert torch.equal(generate(m, 4, top_k=1), generate(m.cpu(), 4, top_k=1))
    save_model(tmp_path / "ck", m, palette=rgb_palette(16))
    ids = sample_to_grid(tmp_path / "ck", 3, tmp_path / "g.png", seed=1, device="cuda")
    assert ids.shape == (3, 64) and (tmp_path / "g.png").stat().st_size > 0
    graphed = sample_to_grid(tmp_path / "ck", 3, tmp_path / "g2.png", seed=1, device="cuda", cuda_graph=True, top_k=1)
    assert np.array_equal(graphed, sample_to_grid(tmp_path / "ck", 3, tmp_path / "g3.png", seed=1, device="cuda",
                                                  top_k=1))


def test_generate_refuses_a_negative_or_non_integer_count_or_a_non_positive_batch_size():
    """A negative batch size made range() empty and returned the uninitialised output buffer as images (ids up to
    1e14); 0 and a negative n were tracebacks."""
    m = tiny_model(seed=1)
    for kw, msg in ((dict(n=3, batch_size=-1), "batch_size must be a positive integer, got -1"),
                    (dict(n=3, batch_size=0), "batch_size must be a positive integer, got 0"),
                    (dict(n=-1), "the number of images must be an integer >= 0, got -1"),
                    (dict(n=2.0), "the number of images must be an integer >= 0, got 2.0")):
        with pytest.raises(IgptError, match=msg):
            generate(m, seed=0, **kw)


def test_generate_takes_numpy_integers_for_its_counts():
    m = tiny_model(seed=1)
    out = generate(m, np.int64(3), seed=0, batch_size=np.int32(2), top_k=1)
    assert out.shape == (3, m.config.seq_len)
