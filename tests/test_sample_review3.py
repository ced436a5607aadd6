"""Third review of sampling: a tiny --top-p, --tokens-out on the PNG's path, an output that is not a regular file."""

import os

import numpy as np
import pytest
import torch
from igpt_testutil import rgb_palette, tiny_model

from igpt.checkpoint import save_model
from igpt.errors import IgptError
from igpt.io import atomic_write_bytes
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
