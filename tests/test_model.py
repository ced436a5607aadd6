"""ImageGPT model: config validation, presets, parity with transformers, masking, features, checkpointing."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from igpt_testutil import PARITY_CONFIGS, hf_model, require_correct_hf_scale, tiny_config, tiny_model

import igpt.model
from igpt.errors import IgptError
from igpt.model import (
    ImageGPT,
    ImageGPTConfig,
    RMSNorm,
    ar_inputs,
    ar_loss,
    bert_loss,
    bert_mask,
    quick_gelu,
)
from igpt.ops import norm_linear, rms_norm, silu_linear
from igpt.presets import PRESETS, get_preset


# -- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_px=True), "n_px"),
    (dict(n_head=2.0), "n_head"),
    (dict(mode="mlm"), "mode"),
    (dict(dropout=1.5), "dropout"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(palette_size=1), "palette_size"),
    (dict(palette_size=70000), "palette_size"),
])
def test_config_validation_names_the_field(bad, field):
    with pytest.raises(IgptError, match=field):
        tiny_config(**bad)


def test_config_json_round_trip_and_unknown_fields():
    cfg = tiny_config(mode="bert", dropout=0.1)
    assert ImageGPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert (cfg.seq_len, cfg.vocab_size, cfg.sos_id, cfg.head_dim) == (64, 17, 16, 8)
    with pytest.raises(IgptError, match="n_ctx"):
        ImageGPTConfig.from_dict({**cfg.to_dict(), "n_ctx": 3})
    with pytest.raises(IgptError, match="import-hf"):
        ImageGPTConfig.from_dict({"model_type": "imagegpt", "n_embd": 8})


def test_presets():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = ImageGPT(get_preset(name)).num_params()
    assert counts["igpt-s"] == 76_682_240  # the paper's "76M"
    assert abs(counts["igpt-m"] / 455e6 - 1) < 0.01 and abs(counts["igpt-l"] / 1362e6 - 1) < 0.01
    assert abs(counts["igpt-xl"] / 6801e6 - 1) < 0.01
    s = get_preset("igpt-s")
    assert (s.n_layer, s.n_embd, s.n_head, s.n_px, s.palette_size) == (24, 512, 8, 32, 512)
    assert get_preset("cpu-small", palette_size=16).palette_size == 16
    with pytest.raises(IgptError, match="igpt-s"):
        get_preset("igpt-q")
    with pytest.raises(IgptError, match="n_embd"):
        get_preset("tiny", n_embd=33)


# -- maths ----------------------------------------------------------------------------------------------------
def test_rms_norm_matches_formula_and_gradcheck():
    x = torch.randn(3, 5, 7, dtype=torch.double, requires_grad=True)
    w = torch.randn(7, dtype=torch.double, requires_grad=True)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-5), ref)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))


def test_mlp_equals_quick_gelu_formula():
    m = tiny_model()
    x = torch.randn(2, 5, 24)
    mlp = m.h[0].mlp
    ref = mlp.c_proj(quick_gelu(mlp.c_fc(x)))
    torch.testing.assert_close(mlp(x), ref, atol=1e-6, rtol=1e-5)
    z = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(quick_gelu(z), z * torch.sigmoid(1.702 * z))


def test_mlp_training_backward_equals_the_formula_and_gradchecks(monkeypatch):
    monkeypatch.setattr(igpt.model, "RECOMPUTE_NUMEL", 0)  # the recomputing backward even at this size
    m = tiny_model().double()
    mlp = m.h[0].mlp
    for p in mlp.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 5, 24, dtype=torch.double, requires_grad=True)
    g = torch.randn(2, 5, 24, dtype=torch.double)
    ref = mlp.c_proj(quick_gelu(mlp.c_fc(x)))  # plain autograd through the formula
    grads_ref = torch.autograd.grad(ref, [x, *mlp.parameters()], g)
    out = mlp(x)  # the recomputing backward (grad enabled, no autocast)
    assert "_SiluLinearFnBackward" in str(out.grad_fn.next_functions)  # (a view of) the custom function's output
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, [x, *mlp.parameters()], g), grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a: mlp(a), (x[:1, :2],))


@pytest.mark.parametrize("bias", [True, False])
def test_norm_linear_equals_norm_then_linear_and_gradchecks(bias):
    norm = RMSNorm(6, 1e-5).double()
    w = norm.weight.detach().normal_(1, 0.3).requires_grad_()
    W = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    b = torch.randn(5, dtype=torch.double, requires_grad=True) if bias else None
    x = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(norm_linear(x, norm, W, b), torch.nn.functional.linear(norm(x), W, b))

    def f(x, w, W, b=None):  # the gain as an input, so gradcheck perturbs it too
        return norm_linear(x, SimpleNamespace(weight=w, eps=1e-5), W, b)

    assert torch.autograd.gradcheck(f, (x, w, W, b) if bias else (x, w, W))


def test_hand_written_backwards_refuse_a_second_derivative():
    """Their backward passes treat saved statistics (1/rms) as constants: right for one derivative, wrong for
    two, so create_graph=True through them must raise rather than return wrong numbers. With a loss linear in
    their output (its incoming gradient a constant) torch's once_differentiable let it through: a penalty on
    lm_head's gradient lost its second-order terms (2.49 against 2037 for ln_f's gradient)."""
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    w = torch.randn(6, dtype=torch.double, requires_grad=True)
    W = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    b = torch.randn(5, dtype=torch.double, requires_grad=True)
    for out in (rms_norm(x, w, 1e-5), norm_linear(x, SimpleNamespace(weight=w, eps=1e-5), W, b),
                silu_linear(x, W, b)):
        for loss in (out.pow(2).sum(), out[..., 1].sum()):  # the second: linear in the output
            with pytest.raises(RuntimeError, match="has no second derivative"):
                torch.autograd.grad(loss, x, create_graph=True, retain_graph=True)
    m = tiny_model()
    logits = m(torch.randint(0, 16, (2, 64)))
    with pytest.raises(RuntimeError, match="norm_linear has no second derivative"):
        torch.autograd.grad(logits[..., 3].sum(), m.lm_head.weight, create_graph=True)
    (g,) = torch.autograd.grad(m(torch.randint(0, 16, (2, 64)))[..., 3].sum(), m.lm_head.weight)  # one: fine
    assert g.abs().sum() > 0


def test_a_half_precision_model_keeps_its_norm_statistics_in_range():
    """fp16 checkpoints load as fp16. The folded norm summed x.x in fp16, which overflows once the residual's rms
    passes sqrt(65504 / d): 1/rms became 0 and the logits all 0 (sampling then silently uniform)."""
    from igpt.decode import Decoder

    m = tiny_model(seed=3)
    with torch.no_grad():
        m.wte.weight.mul_(3000)  # residual rms ~ 60, above sqrt(65504 / 32) = 45
    idx = torch.randint(0, 16, (2, 64))
    with torch.no_grad():
        want = m(idx)
        got = m.half()(idx).float()
    assert got.abs().max() > 0.5 * want.abs().max()
    assert torch.allclose(got, want, atol=3e-2 * want.abs().max().item())
    with torch.no_grad():
        last = Decoder(m, 2).prefill(idx[:, :10]).float()
    assert torch.allclose(last, want[:, 9], atol=3e-2 * want.abs().max().item())
    # the probe's features and fine-tuning go through the norm module itself: those became all zeros
    f32, f16 = (mm.features(idx, [0, 1, 2]) for mm in (copy.deepcopy(m).float(), m))
    for layer in (0, 1, 2):
        assert f16[layer].dtype == torch.float16
        assert torch.allclose(f16[layer].float(), f32[layer], atol=2e-2), layer
    x = (torch.randn(4, 32) * 300).half().requires_grad_()  # rms 300: x.x overflows fp16
    w = torch.ones(32, dtype=torch.float16, requires_grad=True)
    y = rms_norm(x, w, 1e-5)
    (y.float() * torch.arange(32.0)).sum().backward()
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    yr = rms_norm(xr, wr, 1e-5)
    (yr * torch.arange(32.0, dtype=torch.double)).sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.float16
    assert torch.allclose(y.double(), yr, atol=1e-2)
    assert torch.allclose(x.grad.double(), xr.grad, atol=1e-2 * xr.grad.abs().max().item())
    assert torch.allclose(w.grad.double(), wr.grad, rtol=1e-2, atol=1e-2)


def test_the_losses_keep_float64():
    """model.double() trained on float32 losses: the logits were cast down (a float64 gradcheck failed)."""
    logits = torch.randn(2, 5, 7, dtype=torch.double, requires_grad=True)
    px, mask = torch.randint(0, 7, (2, 5)), torch.rand(2, 5) < 0.5
    mask[:, 0] = True
    assert ar_loss(logits, px).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z: ar_loss(z, px), (logits,))
    assert torch.autograd.gradcheck(lambda z: bert_loss(z, px, mask), (logits,))
    assert ar_loss(logits.detach().bfloat16(), px).dtype == torch.float32  # low precision still upcast


def test_init_as_the_paper():
    m = ImageGPT(ImageGPTConfig(n_px=8, palette_size=16, n_embd=64, n_layer=8, n_head=4))
    assert not m.lm_head.weight.any()  # zero logit head
    assert all(not b.detach().any() for n, b in m.named_parameters() if n.endswith(".bias"))
    assert torch.all(m.h[3].ln_1.weight == 1) and torch.all(m.ln_f.weight == 1)
    proj = torch.cat([m.h[i].mlp.c_proj.weight.flatten() for i in range(8)])
    fc = torch.cat([m.h[i].mlp.c_fc.weight.flatten() for i in range(8)])
    assert abs(proj.std().item() - 0.02 / math.sqrt(16)) < 0.0006
    assert abs(fc.std().item() - 0.02) < 0.0005
    x = torch.randint(0, 16, (2, 64))
    assert torch.all(m(x) == 0)


# -- parity with transformers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", PARITY_CONFIGS)
def test_logits_and_hidden_states_match_transformers(shape):
    from igpt.hf import hf_state_to_ours

    n_px, d, L, H, K = shape
    require_correct_hf_scale(d // H)
    ref = hf_model(*shape, seed=L + H)
    ours, _ = hf_state_to_ours(ref.state_dict(), "test")
    m = ImageGPT(ImageGPTConfig(n_px=n_px, palette_size=K, n_embd=d, n_layer=L, n_head=H)).eval()
    m.load_state_dict(ours)
    idx = ar_inputs(torch.randint(0, K, (3, n_px * n_px)), K)
    with torch.no_grad():
        out = ref(idx, output_hidden_states=True)
        logits, hidden = m(idx), m.hidden_states(idx)
    assert (out.logits - logits).abs().max() <= 1e-5
    assert len(hidden) == len(out.hidden_states) == L + 1
    for a, b in zip(hidden, out.hidden_states):
        assert (a - b).abs().max() <= 1e-5


# -- objectives -----------------------------------------------------------------------------------------------
def test_ar_inputs_and_loss_score_every_pixel():
    x = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    assert ar_inputs(x, 16).tolist() == [[16, 3, 1, 4], [16, 5, 9, 2]]
    logits = torch.randn(2, 4, 16)
    ref = -torch.log_softmax(logits, -1).gather(-1, x[..., None]).mean()
    torch.testing.assert_close(ar_loss(logits, x), ref)


def test_causality_in_ar_mode():
    m = tiny_model()
    x = torch.randint(0, 16, (2, 64))
    y = x.clone()
    y[:, 40] = (y[:, 40] + 1) % 16
    with torch.no_grad():
        a, b = m(ar_inputs(x, 16)), m(ar_inputs(y, 16))
    assert torch.equal(a[:, :41], b[:, :41])  # input 41 is the first to hold x_40
    assert (a[:, 41:] - b[:, 41:]).abs().max() > 1e-4


def test_bert_mask_fraction_and_seed():
    g = torch.Generator().manual_seed(0)
    m = bert_mask((64, 1024), g)
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.15) < 0.01
    assert torch.equal(m, bert_mask((64, 1024), torch.Generator().manual_seed(0)))
    assert not torch.equal(m, bert_mask((64, 1024), torch.Generator().manual_seed(1)))


def test_bert_mode_is_bidirectional_and_hides_masked_tokens():
    m = tiny_model(mode="bert")
    x = torch.randint(0, 16, (2, 64))
    mask = bert_mask((2, 64), torch.Generator().manual_seed(0))
    mask[:, 10] = True
    y = torch.where(mask, (x + 3) % 16, x)  # only masked ids differ
    with torch.no_grad():
        torch.testing.assert_close(m(x, mask), m(y, mask), rtol=0, atol=0)
        z = x.clone()
        z[:, 60] = (z[:, 60] + 1) % 16
        mask[:, 60] = False
        assert (m(x, mask)[:, :5] - m(z, mask)[:, :5]).abs().max() > 1e-5  # no causal mask
    logits = torch.randn(2, 64, 16)
    loss = bert_loss(logits, x, mask)
    logits2 = torch.where(mask[..., None], logits, torch.randn(2, 64, 16))  # unmasked logits don't count
    torch.testing.assert_close(bert_loss(logits2, x, mask), loss)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view(2, 64)
    ref = torch.stack([ce[i][mask[i]].mean() for i in range(2)]).mean()
    torch.testing.assert_close(loss, ref)
    none = torch.zeros_like(mask[:1])  # a third image with no masked position is left out, not scored as 0
    torch.testing.assert_close(bert_loss(torch.cat([logits, logits[:1]]), torch.cat([x, x[:1]]),
                                         torch.cat([mask, none])), ref)


# -- features -------------------------------------------------------------------------------------------------
def test_features_equal_manual_computation_and_stop_early():
    m = tiny_model(n_layer=4)
    idx = ar_inputs(torch.randint(0, 16, (3, 64)), 16)
    calls = []
    hooks = [blk.register_forward_hook(lambda mod, i, o, n=n: calls.append(n)) for n, blk in enumerate(m.h)]
    with torch.no_grad():
        f = m.features(idx, [0, 2])
    assert calls == [0, 1]  # blocks 2 and 3 never ran
    calls.clear()
    with torch.no_grad():
        full = m.features(idx, [4, 1])
    assert calls == [0, 1, 2, 3]
    with torch.no_grad():
        hs = m.hidden_states(idx)
    for h in hooks:
        h.remove()
    x = m.embed(idx)
    manual = {}
    with torch.no_grad():
        for layer in range(4):
            manual[layer] = m.h[layer].ln_1(x).mean(1)
            x = m.h[layer](x)
        manual[4] = m.ln_f(x).mean(1)
    assert sorted(f) == [0, 2] and sorted(full) == [1, 4]
    for layer, v in {**f, **full}.items():
        assert v.shape == (3, 24)
        torch.testing.assert_close(v, manual[layer], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(full[4], hs[-1].mean(1))
    with pytest.raises(IgptError, match="0..4"):
        m.features(idx, [5])


# -- training-path pieces -------------------------------------------------------------------------------------
def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    x = torch.randint(0, 16, (2, 64))
    grads = []
    for ckpt in (False, True):
        m = tiny_model(seed=1)
        m.activation_checkpointing = ckpt
        m.train()
        ar_loss(m(ar_inputs(x, 16)), x).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_a_few_adamw_steps_lower_the_loss():
    torch.manual_seed(0)
    m = ImageGPT(tiny_config()).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 4, (8, 64))  # 4 of the 16 colours used: easy to learn
    losses = []
    for _ in range(15):
        loss = ar_loss(m(ar_inputs(x, 16)), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(16), rel=1e-4)  # zero head: uniform over 16 colours
    assert losses[-1] < 0.7 * losses[0]


def test_rejects_sequences_longer_than_the_context():
    m = tiny_model()
    with pytest.raises(IgptError, match="context"):
        m(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("causal", [True, False])
def test_low_precision_short_attention_path_matches_sdpa(causal):
    from igpt.ops import attention

    q, k, v = (torch.randn(2, 3, 64, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, causal)
    ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, is_causal=causal)
    assert out.shape == ref.shape and (out.float() - ref).abs().max() < 0.05
    g = torch.randn_like(ref)
    out.backward(g.bfloat16())
    ref.backward(g)
    for a, b in ((q, q32), (k, k32), (v, v32)):  # gradients of the fp32 reference, to bf16 precision
        assert (a.grad.float() - b.grad).abs().max() < 0.05 * b.grad.abs().max() + 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_forward_and_backward():
    x = torch.randint(0, 16, (4, 256))
    out = []
    for dev in ("cpu", "cuda"):
        m = tiny_model(seed=2, n_px=16, n_embd=48, n_head=3).to(dev).train()
        loss = ar_loss(m(ar_inputs(x.to(dev), 16)), x.to(dev))
        loss.backward()
        out.append((loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()]).cpu()))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-5, rtol=1e-3)
    m = tiny_model(seed=2, n_px=16, n_embd=48, n_head=3).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(m(ar_inputs(x.cuda(), 16))).all()
