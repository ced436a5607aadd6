"""KV-cached decoding: cached logits equal uncached ones at every step, the fixed-shape step a CUDA graph
replays equals them too, and the graph replays equal plain decoding (GPU)."""

import pytest
import torch
from igpt_testutil import tiny_model

from igpt.decode import Decoder
from igpt.errors import IgptError
from igpt.model import ar_inputs
from igpt.sample import generate


@pytest.mark.parametrize("prefill", [1, 23])
def test_cached_logits_equal_uncached_at_every_step(prefill):
    m = tiny_model(seed=1, n_px=8, n_embd=36, n_head=6)
    x = torch.randint(0, 16, (3, 64))
    idx = ar_inputs(x, 16)
    with torch.no_grad():
        full = m(idx)  # (3, 64, 16)
    dec = Decoder(m, 3)
    assert (dec.prefill(idx[:, :prefill]) - full[:, prefill - 1]).abs().max() <= 1e-5
    for t in range(prefill, 64):
        assert (dec.step(idx[:, t]) - full[:, t]).abs().max() <= 1e-5, t
    with pytest.raises(IgptError, match="full"):
        dec.step(idx[:, 0])


def test_static_step_equals_the_uncached_logits():
    """step_static (fixed shapes, the whole zeroed cache read with later positions masked: what a CUDA graph
    replays) gives the uncached logits at every position; it needs a static decoder, and graphs a CUDA model."""
    m = tiny_model(seed=1, n_px=8, n_embd=36, n_head=6)
    idx = ar_inputs(torch.randint(0, 16, (3, 64)), 16)
    with torch.no_grad():
        full = m(idx)
    dec = Decoder(m, 3, static=True)
    assert (dec.prefill(idx[:, :5]) - full[:, 4]).abs().max() <= 1e-5
    for t in range(5, 64):
        assert (dec.step_static(idx[:, t], torch.tensor(t)) - full[:, t]).abs().max() <= 1e-5, t
    with pytest.raises(IgptError, match="static=True"):
        Decoder(m, 3).step_static(idx[:, 0], torch.tensor(0))
    with pytest.raises(IgptError, match="CUDA"):
        dec.capture()
    with pytest.raises(IgptError, match="cuda_graph needs a model on a CUDA device"):
        generate(m, 2, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_equals_plain_decoding():
    m = tiny_model(seed=1, n_px=8, n_embd=36, n_head=6).cuda()
    idx = ar_inputs(torch.randint(0, 16, (3, 64)), 16).cuda()
    with torch.no_grad():
        full = m(idx)
    dec = Decoder(m, 3, static=True)
    dec.capture()
    assert (dec.prefill(idx[:, :9]) - full[:, 8]).abs().max() <= 1e-5
    for t in range(9, 64):
        assert (dec.step(idx[:, t]) - full[:, t]).abs().max() <= 1e-5, t  # replays of the graph
    prefix = torch.randint(0, 16, (4, 16))
    g = generate(m, 4, prefix=prefix, top_k=1, cuda_graph=True)
    assert torch.equal(g, generate(m, 4, prefix=prefix, top_k=1))
    s = generate(m, 4, prefix=prefix, seed=3, top_k=5, cuda_graph=True)
    assert torch.equal(s[:, :16], prefix) and torch.equal(s, generate(m, 4, prefix=prefix, seed=3, top_k=5,
                                                                     cuda_graph=True))
