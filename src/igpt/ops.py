"""The model's kernels: attention (the path chosen by device, dtype and length) and eager-mode autograd Functions
with hand-written backward passes (weight-only RMS norm, the norm folded into the next matmul, an MLP output
that recomputes its activation). Each equals the plain composition it replaces (tests/test_model.py); inside
torch.compile the plain compositions are traced instead (see ``rms_norm``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) [+ causal mask]) v for (B, H, T, hd) inputs.

    SDPA's fused CPU flash kernel never materialises the (T, T) scores; measured on 2 cores it beats the math
    path in fp32 at T = 256 (3x, fwd+bwd) and T = 1024 (4x). Only for bf16 on CPU at T <= 256 is plain matmul
    attention faster (1.1-1.5x fwd+bwd; the flash backward is slow there), so that case takes it, as 3-D
    batched matmuls with the scale and causal mask folded into the first (baddbmm): 1.16x faster bf16 training
    steps at T = 144 and 1.30x at T = 256 than 4-D matmul + masked_fill (cpu-small, batch 16).
    """
    B, H, T, hd = q.shape
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and T <= 256 and dropout_p == 0.0
            and k.shape == v.shape == q.shape):
        kt = k.reshape(B * H, T, hd).transpose(1, 2)
        if causal:  # scale and mask inside the matmul (baddbmm): no separate passes over the (T, T) scores
            # while compiling, the uncached function: dynamo traces it into the graph (it warns on lru_cache)
            make = causal_bias.__wrapped__ if torch.compiler.is_compiling() else causal_bias
            bias = make(T, q.dtype, q.device)
            s = torch.baddbmm(bias, q.reshape(B * H, T, hd), kt, alpha=hd**-0.5)
        else:
            s = torch.bmm(q.reshape(B * H, T, hd), kt).mul_(hd**-0.5)
        return torch.bmm(torch.softmax(s, dim=-1), v.reshape(B * H, T, hd)).view(B, H, T, hd)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)


@functools.lru_cache(maxsize=8)
def causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T, T): 0 on and below the diagonal, -inf above (added to the scores of the short attention path)."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)


# -- hand-written autograd Functions (eager mode) --------------------------------------------------------------
def first_derivative_only(name: str) -> None:
    """Called at the top of each backward below: they treat saved statistics (1/rms) as constants, right for one
    derivative and wrong for two. Grad mode is on inside a backward exactly when create_graph=True asked for a
    differentiable gradient, so that is refused here. (torch's once_differentiable refused only when the
    incoming gradient itself required grad: a loss linear in the output, e.g. a gradient penalty on
    lm_head's gradient, silently lost its second-order terms.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(f"igpt's {name} has no second derivative (create_graph=True); use the plain "
                           "composition (what torch.compile traces) for higher-order gradients")


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """x.x over the last dim, in float32 for fp16 input (the sum overflows fp16 once the rms passes
    sqrt(65504 / d): 11.3 at d = 512, and 1/rms then became 0: all-zero logits)."""
    xf = x.float() if x.dtype == torch.float16 else x
    return torch.linalg.vecdot(xf, xf)


class _RMSNormFn(torch.autograd.Function):
    """rms_norm with a hand-written backward: fewer passes over (N, d) than the composite F.rms_norm, and it
    saves only x and rstd (N, 1) (measured 1.65x faster forward + backward at N = 8192, d = 256)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float() if x.dtype == torch.float16 else x  # fp16's x^2 overflows past 256: rstd 0 (sum_of_squares)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1), float32 for fp16 x
        ctx.save_for_backward(x, w, rstd)
        return (x * rstd).to(x.dtype).mul_(w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        first_derivative_only("rms_norm")
        x, w, rstd = ctx.saved_tensors
        xhat = x * rstd
        gw = (g * w).to(xhat.dtype)  # float32 for fp16 x (rstd is)
        dot = torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(x.shape[-1])  # (..., 1)
        dx = torch.addcmul(gw, xhat, dot, value=-1.0).mul_(rstd)  # rstd * (gw - xhat * mean(gw * xhat))
        dw = (g * xhat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(w.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight: OpenAI's `norm` (no mean subtraction, no bias).

    The hand-written autograd Functions of this module are eager-mode optimisations. Inside torch.compile the
    plain compositions are traced instead (the compiler fuses them itself): torch 2.11 on an H100 computed
    wrong gradients for compiled blocks through ``_RMSNormFn`` under bf16 autocast (relative error ~1 on the
    norm gains, 0.8 median over all parameters; with F.rms_norm 2e-3, bf16 rounding), which matches
    pytorch/pytorch#180642 (an in-place op on an autograd.Function's output misroutes its gradient when
    compiled). ``bench/compile_check.py`` compares compiled and eager gradients."""
    if torch.compiler.is_compiling():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _RMSNormFn.apply(x, weight, eps)


class _NormLinearFn(torch.autograd.Function):
    """rms_norm(x, w) @ W^T (+ b) for x (N, d) with the norm folded into the matmul: the per-row 1/rms commutes
    with it, so y = rstd * (x @ (W diag(w))^T) + b. It saves x and rstd (N, 1) instead of x and the normalised
    copy, and makes ~5 elementwise passes over (N, d) where rms_norm + linear made ~11 (each ~0.5-1 ms at
    N = 8192, d = 128 on one core). Measured on one core: training steps 3% faster at t16, 5% at s32."""

    @staticmethod
    def forward(ctx, x, w, W, b, eps: float):
        rstd = torch.rsqrt(sum_of_squares(x).div_(x.shape[-1]).add_(eps)).unsqueeze_(-1).to(x.dtype)  # (N, 1)
        ctx.save_for_backward(x, w, W, rstd)
        ctx.has_bias = b is not None
        if x.dtype == torch.float16:  # x @ W' is rms times the normalised product: fp16 overflows it first
            xs = x * rstd
            return torch.mm(xs, (W * w).t()) if b is None else torch.addmm(b, xs, (W * w).t())
        m = torch.mm(x, (W * w).t())  # (N, out)
        return m.mul_(rstd) if b is None else torch.addcmul(b, m, rstd)

    @staticmethod
    def backward(ctx, g):
        first_derivative_only("norm_linear")
        x, w, W, rstd = ctx.saved_tensors
        xs = x * rstd  # (N, d) the normalised x before the gain
        h = g.mm(W * w)  # (N, d) gradient w.r.t. the normalised-and-scaled input
        dwW = g.t().mm(xs)  # (out, d) gradient w.r.t. W diag(w)
        dot = torch.linalg.vecdot(h, xs).div_(x.shape[-1]).unsqueeze_(-1)  # (N, 1)
        dx = torch.addcmul(h, xs, dot, value=-1.0).mul_(rstd)  # rstd * (h - xs * mean(h * xs))
        return dx, (dwW * W).sum(0), dwW * w, g.sum(0) if ctx.has_bias else None, None


def norm_linear(x: torch.Tensor, norm, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(norm(x), weight, bias) for x (..., d); one folded kernel sequence unless autocast is on (then
    the plain composition, so autocast's casts apply as usual) or torch.compile traces it (see ``rms_norm``)."""
    if torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
        return F.linear(norm(x), weight, bias)
    y = _NormLinearFn.apply(x.reshape(-1, x.shape[-1]), norm.weight, weight, bias, norm.eps)
    return y.view(*x.shape[:-1], weight.shape[0])


class _SiluLinearFn(torch.autograd.Function):
    """silu(z) @ W^T + b for z (N, k) that saves z but not silu(z): the backward recomputes it (one elementwise
    pass), so the MLP keeps one (N, 4d) tensor per layer for the backward instead of two."""

    @staticmethod
    def forward(ctx, z, W, b):
        ctx.save_for_backward(z, W)
        return torch.addmm(b, F.silu(z), W.t())  # (N, out)

    @staticmethod
    def backward(ctx, g):
        first_derivative_only("silu_linear")
        z, W = ctx.saved_tensors
        dW = g.t().mm(F.silu(z))  # (out, k)
        return torch.ops.aten.silu_backward(g.mm(W), z), dW, g.sum(0)


def silu_linear(z: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.linear(F.silu(z), W, b) for z (N, k), saving z but not silu(z) (``_SiluLinearFn``)."""
    return _SiluLinearFn.apply(z, W, b)
