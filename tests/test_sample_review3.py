"""Third review of sampling: a tiny --top-p, --tokens-out on the PNG's path, an output that is not a regular file."""

import os

import numpy as np
import pytest
import torch
from igpt_testutil import rgb_palette, tiny_model

from igpt.checkpoint import save_model
from igpt.errors import IgptError
from igpt.io import atomic_write_bytes
from igpt.palette import Palette
from igpt.sample import filter_logits, generate, pick_tokens, sample_to_grid


def test_a_top_p_below_float32s_range_is_greedy_not_damage():
    """--top-p 1e-50 is 0 in float32, so every token's preceding mass (0 for the first) 'reached' it: all were
    dropped, the softmax was NaN, and sampling stopped calling the model's weights damaged (as the tiny
    temperature did before). The most likely token always stays, as transformers' min_tokens_to_keep=1."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.0]])
    for p in (1e-50, 1e-300):
        assert torch.isfinite(filter_logits(logits.clone(), top_p=p)).sum(1).tolist() == [1, 1]
        bad = torch.zeros(2, dtype=torch.bool)
        picks = pick_tokens(logits.clone(), torch.empty(2, 1), torch.Generator().manual_seed(0), top_p=p, bad=bad)
        assert picks.tolist() == [1, 0] and not bad.any()
    m = tiny_model(seed=2)
    assert torch.equal(generate(m, 3, top_p=1e-50), generate(m, 3, top_k=1))


def test_tokens_out_on_the_png_path_is_refused(tmp_path, monkeypatch):
    """--tokens-out with the --out path wrote the PNG, then replaced it with the .npy: exit 0, no picture."""
    import igpt.sample as S

    save_model(tmp_path / "ck", tiny_model(seed=5), palette=rgb_palette(16))
    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("sampled before checking the outputs"))
    (tmp_path / "g.png").write_bytes(b"old")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path)
    for same in (tmp_path / "g.png", "./g.png", tmp_path / "link" / "g.png"):  # other spellings of the same file
        with pytest.raises(IgptError, match="--tokens-out .* is the --out PNG's path"):
            sample_to_grid(tmp_path / "ck", 2, "g.png", tokens_out=same)
    assert (tmp_path / "g.png").read_bytes() == b"old"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_an_output_that_is_not_a_regular_file_is_refused_not_replaced(tmp_path):
    """The atomic write's rename replaced whatever was at --out: `--out /dev/null` (as root) turned the system's
    /dev/null into a PNG file. A named pipe stands in for the device here."""
    save_model(tmp_path / "ck", tiny_model(seed=5), palette=rgb_palette(16))
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    for kw in (dict(out_png=pipe), dict(out_png=tmp_path / "g.png", tokens_out=pipe)):
        with pytest.raises(IgptError, match="pipe.png is not a regular file"):
            sample_to_grid(tmp_path / "ck", 2, seed=0, **kw)
    with pytest.raises(IgptError, match="pipe.png is not a regular file"):
        atomic_write_bytes(pipe, b"x")
    assert pipe.exists() and not pipe.is_file() and not (tmp_path / "g.png").exists()
    ids = sample_to_grid(tmp_path / "ck", 2, tmp_path / "g.png", seed=0, top_k=1)  # a regular file still works
    assert ids.shape == (2, 64) and np.asarray(ids).dtype == np.uint16


def test_the_memory_check_counts_a_completion_grids_cells(monkeypatch):
    """check_memory counted n grid cells, but a completion grid holds ceil(n / per_image) * (2 + per_image):
    up to 3n with --per-image 1 (each original, its top rows and one completion)."""
    import igpt.sample as S

    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (1 << 30) // 4096}  # a machine of 1 GiB
    monkeypatch.setattr(S.os, "sysconf", lambda name: pages[name])
    n = 15_000  # 8x8 images drawn at 16x: 49 KB per RGB cell, 0.75 GB for n cells, 2.2 GB for 3n
    S.check_memory(n, 8, 3)
    with pytest.raises(IgptError, match=f"--n {n}: the ids and the PNG grid need about 2.1 GiB"):
        S.check_memory(n, 8, 3, cells=3 * n)


def test_sample_to_grid_checks_the_memory_of_the_grid_it_draws(tmp_path, monkeypatch):
    from test_sample import _shards

    import igpt.sample as S

    shards = _shards(tmp_path / "sh", np.random.default_rng(0).integers(0, 16, (4, 64)), split="val")
    save_model(tmp_path / "ck", tiny_model(seed=6), palette=Palette.load(shards / "palette.npy"))
    seen = []
    monkeypatch.setattr(S, "check_memory", lambda n, n_px, channels, cells: seen.append((n, cells)))
    for n, per_image in ((5, 2), (3, 1)):  # 3 originals x (original, top rows, 2) cells; 3 x (2 + 1)
        sample_to_grid(tmp_path / "ck", n, tmp_path / "c.png", complete_from=shards, per_image=per_image, top_k=1)
    sample_to_grid(tmp_path / "ck", 4, tmp_path / "c.png", top_k=1)  # unconditional: one cell per image
    assert seen == [(5, 12), (3, 9), (4, 4)]
