"""Review of the model's forward paths (second pass): findings that failed on the code as reviewed."""

import copy

import torch
from igpt_testutil import tiny_model

from igpt.decode import Decoder
from igpt.model import ar_inputs
from igpt.sample import generate, pick_tokens


def _large_residual_model(scale: float, d: int = 256):
    """A small model whose residual stream has rms ~0.33 * scale (the token embedding scaled up), as deep
    pre-norm transformers' residuals grow; its logits stay ordinary (the norms divide the scale out)."""
    m = tiny_model(seed=3, n_embd=d, n_head=4, n_layer=1, n_px=4)
    with torch.no_grad():
        m.wte.weight.mul_(scale)
    return m


def test_fp16_cached_decoding_equals_the_fp16_forward_at_a_large_residual():
    """The decoder folds sqrt(d) into its weights and applies 1/rms after the matmul, so x @ w is sqrt(d) times
    the model's own folded product (and rms times the plain composition's): in fp16 it overflowed to inf once
    the residual's rms passed ~700 at d = 256 (~300 at igpt-l's 1536), while the fp16 forward was still accurate
    to 5e-3. The NaN logits then made sampling blame the weights ("damaged or training diverged")."""
    m = _large_residual_model(3000.0)  # residual rms ~1000, elements < 4,000: well inside fp16
    idx = ar_inputs(torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0)), 16)
    with torch.no_grad():
        want = m(idx)  # fp32 reference
        mh = copy.deepcopy(m).half()
        assert (mh(idx).float() - want).abs().max() < 0.02  # the uncached fp16 forward is fine
    dec = Decoder(mh, 2)
    got = [dec.prefill(idx[:, :5]).float()] + [dec.step(idx[:, t]).float() for t in range(5, 16)]
    for t, g in zip(range(4, 16), got, strict=True):
        assert torch.isfinite(g).all(), t
        assert (g - want[:, t]).abs().max() < 0.02, t
    generate(mh, 2, seed=0)  # raised IgptError: "non-finite logits ... its weights are damaged"


def test_fp16_forward_keeps_the_folded_norm_in_range():
    """The same in the model's own norm folded into the next matmul (x @ (W diag w)^T, then * 1/rms): fp16
    overflowed at a residual rms of ~7,700 (elements ~30,000, still inside fp16) where the plain composition
    (norm first) was exact to 3e-3."""
    m = _large_residual_model(24000.0)
    idx = ar_inputs(torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0)), 16)
    with torch.no_grad():
        want = m(idx)
        got = copy.deepcopy(m).half()(idx).float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.02


def test_a_temperature_below_float32s_range_is_greedy_not_an_error():
    """check_sampling accepts any finite temperature > 0, but the logits were divided by it in float32: a
    temperature under float32's smallest subnormal (1e-46, 1e-50) became 0, the row maximum 0 / 0 = NaN, and
    generate() (and `igpt sample --temperature 1e-50`) failed with "the model produced non-finite logits ...
    its weights are damaged or training diverged" about a healthy model. 1e-38 was already greedy."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.0]])
    for t in (1e-46, 1e-50, 1e-300):
        bad = torch.zeros(2, dtype=torch.bool)
        picks = pick_tokens(logits.clone(), torch.empty(2, 1), torch.Generator().manual_seed(0), temperature=t,
                            bad=bad)
        assert picks.tolist() == [1, 0] and not bad.any(), t
    m = tiny_model(seed=2)
    greedy = generate(m, 2, top_k=1)
    assert torch.equal(generate(m, 2, temperature=1e-50), greedy)
    # a temperature past float32's largest (inf there) must not turn a filtered -inf into NaN either
    bad = torch.zeros(1, dtype=torch.bool)
    pick_tokens(torch.tensor([[0.0, float("-inf"), 1.0]]), torch.empty(1, 1), torch.Generator().manual_seed(0),
                temperature=1e39, bad=bad)
    assert not bad.any()
