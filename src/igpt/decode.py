"""KV-cached incremental forward of an ImageGPT (the decoding half of sampling and completion).

``Decoder`` runs a model incrementally over a cache preallocated for the whole image, with the norm gains,
the 1/sqrt(head_dim) attention scale and quick-GELU's 1.702 folded into the matmul weights once, so a decode
step is a short fixed sequence of kernels with no allocation of cache memory. Attention for the single new
query row is two batched matmuls against the cached keys and values. On a GPU one step can be recorded as a
CUDA graph and replayed (``static=True``, ``capture``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from igpt.errors import IgptError
from igpt.model import GELU_SCALE, ImageGPT
from igpt.ops import sum_of_squares


@dataclass
class _Layer:  # one block's weights folded for decoding (see _norm_linear for the sqrt(d))
    w_qkv: torch.Tensor  # (d, 3d) = sqrt(d) diag(ln_1) @ c_attn^T, q columns scaled by 1/sqrt(hd)
    b_qkv: torch.Tensor  # (3d,)
    w_o: torch.Tensor  # (d, d) attn.c_proj^T
    b_o: torch.Tensor
    w_fc: torch.Tensor  # (d, 4d) = 1.702 sqrt(d) diag(ln_2) @ c_fc^T
    b_fc: torch.Tensor  # (4d,) = 1.702 * c_fc.bias
    w_p: torch.Tensor  # (4d, d) = mlp.c_proj^T / 1.702
    b_p: torch.Tensor


class Decoder:
    """Incremental forward of ``model`` for ``batch`` sequences over a preallocated KV cache.

    ``prefill(idx)`` runs the first tokens (B, P) in one causal pass and returns the logits (B, K) of the last
    one; ``step(tok)`` feeds one token per sequence (B,) at the next position and returns its logits (B, K).
    AR models only. The returned logits live in a buffer reused by the next call. ``static=True`` zeroes the
    cache for ``step_static`` (fixed shapes) and ``capture`` (on CUDA, step() then replays one recorded graph).
    """

    @torch.inference_mode()
    def __init__(self, model: ImageGPT, batch: int, static: bool = False):
        cfg = model.config
        if not cfg.causal:
            raise IgptError("sampling needs an autoregressive ('ar') model; this one is 'bert'")
        p = next(model.parameters())
        self.cfg, self.B = cfg, batch
        # d * eps as a 0-dim tensor of the model's dtype: adding a Python float converts it on every call
        self.deps = torch.tensor(cfg.n_embd * cfg.norm_eps, dtype=p.dtype, device=p.device)
        H, hd, d, T = cfg.n_head, cfg.head_dim, cfg.n_embd, cfg.seq_len
        self.wte, self.wpe = model.wte.weight.detach(), model.wpe.weight.detach()
        rd = math.sqrt(d)
        self.layers = []
        for blk in model.h:
            qscale = torch.ones(3 * d, dtype=p.dtype, device=p.device)
            qscale[:d] = 1.0 / math.sqrt(hd)
            self.layers.append(_Layer(
                w_qkv=(rd * blk.ln_1.weight[:, None] * blk.attn.c_attn.weight.t() * qscale).contiguous(),
                b_qkv=blk.attn.c_attn.bias * qscale,
                w_o=blk.attn.c_proj.weight.t().contiguous(), b_o=blk.attn.c_proj.bias.detach(),
                w_fc=(GELU_SCALE * rd * blk.ln_2.weight[:, None] * blk.mlp.c_fc.weight.t()).contiguous(),
                b_fc=GELU_SCALE * blk.mlp.c_fc.bias,
                w_p=(blk.mlp.c_proj.weight.t() / GELU_SCALE).contiguous(), b_p=blk.mlp.c_proj.bias.detach(),
            ))
        self.w_head = (rd * model.ln_f.weight[:, None] * model.lm_head.weight.t()).contiguous()  # (d, K)
        # Keys transposed (L, B, H, hd, T) and values (L, B, H, T, hd): the single-row attention then reads both
        # as contiguous rows. Once the cache outgrows the CPU caches (t ~ 1000 at s32) this streamed 1.4x faster
        # than SDPA over a (B, H, T, hd) key cache; over a whole 32x32 image the two measured about equal.
        # Entries at positions >= pos are garbage until written; ``static`` zeroes them (step_static reads them,
        # masked, and 0 * NaN garbage would be NaN).
        alloc = torch.zeros if static else torch.empty
        self.k = alloc(cfg.n_layer, batch, H, hd, T, dtype=p.dtype, device=p.device)
        self.v = alloc(cfg.n_layer, batch, H, T, hd, dtype=p.dtype, device=p.device)
        self.logits = torch.empty(batch, cfg.palette_size, dtype=p.dtype, device=p.device)
        self.positions = torch.arange(T, device=p.device) if static else None  # (T,)
        self.pos = 0
        self.graph = None

    def _norm_linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """rms_norm(x) @ W + b for x (N, d). The per-row 1/rms commutes with the matmul, so it scales the output:
        (x @ w) / sqrt(x.x + d eps) + b, with w = sqrt(d) W (4 small kernels instead of rms_norm's ~8)."""
        r = sum_of_squares(x).add_(self.deps).rsqrt_().unsqueeze_(-1).to(x.dtype)  # (N, 1); fp32 sum for fp16
        if x.dtype == torch.float16:  # x @ w is sqrt(d) * rms times the normalised product: it overflowed fp16
            x = x * r  # once the residual's rms passed ~700 at d = 256 (the model's forward still fine); norm first
            return torch.mm(x, w, out=out) if b is None else torch.addmm(b, x, w)
        if b is None:
            return torch.mm(x, w, out=out).mul_(r)
        return torch.addcmul(b, torch.mm(x, w), r)

    @torch.inference_mode()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, P) input ids at positions 0..P-1 (P >= 1) -> logits (B, K) predicting position P-1's pixel."""
        B, P = idx.shape
        if B != self.B or not 1 <= P <= self.cfg.seq_len:
            raise IgptError(f"prefill expects ({self.B}, 1..{self.cfg.seq_len}) ids, got {tuple(idx.shape)}")
        H, hd, d = self.cfg.n_head, self.cfg.head_dim, self.cfg.n_embd
        x = self.wte[idx.long()] + self.wpe[:P]  # (B, P, d)
        for i, ly in enumerate(self.layers):
            qkv = self._norm_linear(x.view(B * P, d), ly.w_qkv, ly.b_qkv).view(B, P, 3, H, hd)
            qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, P, hd)
            self.k[i, :, :, :, :P] = qkv[1].transpose(-1, -2)
            self.v[i, :, :, :P] = qkv[2]
            y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True, scale=1.0)  # q pre-scaled
            x = x + torch.addmm(ly.b_o, y.transpose(1, 2).reshape(B * P, d), ly.w_o).view(B, P, d)
            f = F.silu(self._norm_linear(x.view(B * P, d), ly.w_fc, ly.b_fc), inplace=True)
            x = x + torch.addmm(ly.b_p, f, ly.w_p).view(B, P, d)
        self.pos = P
        return self._norm_linear(x[:, -1], self.w_head, out=self.logits)

    @torch.inference_mode()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """tok (B,) ids at position self.pos -> logits (B, K) predicting that position's pixel."""
        t = self.pos
        if t >= self.cfg.seq_len:
            raise IgptError(f"the sequence is full ({self.cfg.seq_len} positions)")
        if self.graph is not None:  # the recorded step_static: inputs into its buffers, one replay
            self.g_tok.copy_(tok)
            self.g_pos.fill_(t)
            self.graph.replay()
            self.pos = t + 1
            return self.logits
        B, H, hd, d = self.B, self.cfg.n_head, self.cfg.head_dim, self.cfg.n_embd
        x = torch.add(self.wte[tok], self.wpe[t])  # (B, d)
        ks, vs = self.k.select(4, t), self.v.select(3, t)  # (L, B, H, hd): where this position's k, v go
        kp, vp = self.k.narrow(4, 0, t + 1), self.v.narrow(3, 0, t + 1)  # (L, B, H, hd, t+1), (L, B, H, t+1, hd)
        for ly, k_slot, v_slot, k, v in zip(self.layers, ks, vs, kp, vp):
            qkv = self._norm_linear(x, ly.w_qkv, ly.b_qkv).view(B, 3, H, hd)
            k_slot.copy_(qkv[:, 1])
            v_slot.copy_(qkv[:, 2])
            a = torch.matmul(qkv[:, 0].unsqueeze(2), k)  # (B, H, 1, t+1); q is pre-scaled
            y = torch.matmul(torch.softmax(a, dim=-1), v)  # (B, H, 1, hd)
            x = torch.addmm(x, y.view(B, d), ly.w_o).add_(ly.b_o)
            f = F.silu(self._norm_linear(x, ly.w_fc, ly.b_fc), inplace=True)
            x = torch.addmm(x, f, ly.w_p).add_(ly.b_p)
        self.pos = t + 1
        return self._norm_linear(x, self.w_head, out=self.logits)

    @torch.inference_mode()
    def step_static(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """step() with fixed shapes and the position on the device: tok (B,) ids at position ``pos`` (a 0-dim
        long tensor) -> logits (B, K); self.pos is not used or changed. Attention runs over the whole cache with
        the positions after ``pos`` masked (more reads than step's prefix, the same result), so that one CUDA
        graph can replay every step (``capture``). Needs a decoder built with ``static=True``."""
        if self.positions is None:
            raise IgptError("step_static needs a Decoder built with static=True")
        B, H, hd, d = self.B, self.cfg.n_head, self.cfg.head_dim, self.cfg.n_embd
        at = pos.view(1)
        x = self.wte[tok] + self.wpe.index_select(0, at)  # (B, d)
        bias = torch.zeros_like(self.positions, dtype=x.dtype).masked_fill_(self.positions > pos, float("-inf"))
        for i, ly in enumerate(self.layers):
            qkv = self._norm_linear(x, ly.w_qkv, ly.b_qkv).view(B, 3, H, hd)
            self.k[i].index_copy_(3, at, qkv[:, 1].unsqueeze(-1))  # (B, H, hd, T) at column pos
            self.v[i].index_copy_(2, at, qkv[:, 2].unsqueeze(2))  # (B, H, T, hd) at row pos
            a = torch.matmul(qkv[:, 0].unsqueeze(2), self.k[i]).add_(bias)  # (B, H, 1, T); q is pre-scaled
            y = torch.matmul(torch.softmax(a, dim=-1), self.v[i])  # (B, H, 1, hd)
            x = torch.addmm(x, y.view(B, d), ly.w_o).add_(ly.b_o)
            f = F.silu(self._norm_linear(x, ly.w_fc, ly.b_fc), inplace=True)
            x = torch.addmm(x, f, ly.w_p).add_(ly.b_p)
        return self._norm_linear(x, self.w_head, out=self.logits)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record step_static as one CUDA graph; step() then replays it (one launch per token instead of ~20
        kernel launches per layer, which bound small-batch decoding on a GPU). Call before prefill: the warm-up
        runs write cache position 0, which prefill then overwrites."""
        if self.positions is None or self.k.device.type != "cuda":
            raise IgptError("CUDA graph decoding needs a CUDA device and a Decoder built with static=True")
        self.g_tok = torch.zeros(self.B, dtype=torch.long, device=self.k.device)
        self.g_pos = torch.zeros((), dtype=torch.long, device=self.k.device)
        side = torch.cuda.Stream(self.k.device)
        side.wait_stream(torch.cuda.current_stream(self.k.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy initialisation, kernel selection)
            for _ in range(2):
                self.step_static(self.g_tok, self.g_pos)
        torch.cuda.current_stream(self.k.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step_static(self.g_tok, self.g_pos)
