"""The iGPT transformer (Chen et al. 2020): a GPT-2 decoder over palette ids, as OpenAI released it.

Architecture (same parameter names and maths as ``transformers``' ImageGPT, so checkpoints map 1:1):
token embedding ``wte`` with palette_size + 1 rows (the last row is start-of-sequence), learned position
embedding ``wpe``, pre-norm blocks ``h[i]`` (``ln_1`` -> ``attn`` -> residual, ``ln_2`` -> ``mlp`` ->
residual), final norm ``ln_f`` and an untied, bias-free head ``lm_head`` with palette_size outputs (it can
never emit SOS). The norm is weight-only RMS (no mean subtraction, no bias, eps 1e-5); the MLP is 4x wide
with quick-GELU x * sigmoid(1.702 x). Single-device code: no data, ranks or training loop in here.

Two objectives share the network: ``ar`` (causal; input [SOS, x0 .. x_{n-2}], output i predicts x_i) and
``bert`` (no causal mask; masked positions get a zero token embedding; loss on masked positions only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from igpt.errors import IgptError
from igpt.ops import attention, norm_linear, rms_norm, silu_linear

MODES = ("ar", "bert")
GELU_SCALE = 1.702  # quick-GELU: x * sigmoid(1.702 x), OpenAI's gelu2
RECOMPUTE_NUMEL = 1 << 23  # MLP activations of at least this many elements (32 MB fp32) recompute silu in backward


@dataclass
class ImageGPTConfig:
    n_px: int = 32  # image side; context length = n_px ** 2 tokens in raster order
    palette_size: int = 512  # colours (the paper's 9-bit palette); vocab = palette_size + 1 (last id = SOS)
    n_embd: int = 512  # residual width d
    n_layer: int = 24
    n_head: int = 8  # head_dim = n_embd / n_head
    mode: str = "ar"  # 'ar': causal next-pixel; 'bert': bidirectional masked-pixel
    dropout: float = 0.0  # the paper trains without dropout
    norm_eps: float = 1e-5  # OpenAI's / HF's RMS-norm epsilon (torch's RMSNorm default differs)
    init_std: float = 0.02  # GPT-2 init; residual projections get init_std / sqrt(2 * n_layer)

    def __post_init__(self) -> None:
        for name in ("n_px", "palette_size", "n_embd", "n_layer", "n_head"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise IgptError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.palette_size < 2 or self.palette_size > 65535:
            raise IgptError(f"model config: palette_size must be in [2, 65535] (uint16 ids), got {self.palette_size}")
        if self.n_embd % self.n_head:
            raise IgptError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.mode not in MODES:
            raise IgptError(f"model config: mode must be one of {MODES}, got {self.mode!r}")
        for name, lo, hi in (("dropout", 0.0, 1.0), ("norm_eps", 0.0, 1.0), ("init_std", 0.0, 10.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v < hi:
                raise IgptError(f"model config: {name} must be a number in [{lo}, {hi}), got {v!r}")
        if self.norm_eps <= 0:
            raise IgptError(f"model config: norm_eps must be > 0, got {self.norm_eps}")

    @property
    def seq_len(self) -> int:
        return self.n_px * self.n_px

    @property
    def vocab_size(self) -> int:
        return self.palette_size + 1

    @property
    def sos_id(self) -> int:
        return self.palette_size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def causal(self) -> bool:
        return self.mode == "ar"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageGPTConfig:
        if not isinstance(d, dict):
            raise IgptError(f"model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hint = " (a Hugging Face config? use `igpt import-hf`)" if d.get("model_type") == "imagegpt" else ""
            raise IgptError(f"model config: unknown field(s) {unknown}{hint}")
        return cls(**d)


# -- maths in small pure functions ---------------------------------------------------------------------------
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) (the reference formula; MLP.forward computes the same with the scalings folded)."""
    return x * torch.sigmoid(GELU_SCALE * x)


def ar_inputs(pixels: torch.Tensor, sos_id: int) -> torch.Tensor:
    """(B, T) palette ids -> (B, T) model inputs [SOS, x0 .. x_{T-2}]; output i then predicts x_i."""
    sos = torch.full_like(pixels[:, :1], sos_id)
    return torch.cat([sos, pixels[:, :-1]], dim=1)


def bert_mask(shape: tuple[int, int], generator: torch.Generator | None = None, p: float = 0.15,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, T) bool, True where a position is masked: each independently with probability p (paper: 0.15)."""
    return torch.rand(shape, generator=generator, device=device) < p


def wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the loss (bf16 / fp16 upcast; float64 kept, so model.double() is exact)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def ar_loss(logits: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per token over every pixel. logits (B, T, K) from ar_inputs(pixels)."""
    return F.cross_entropy(wide(logits.flatten(0, 1)), pixels.flatten().long())


def bert_loss(logits: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Nats per masked token: per image the mean over its masked positions, then the mean over the images that
    have a masked position (an image without one has nothing to score and is left out, not counted as 0; 0 if
    no image has one)."""
    ce = F.cross_entropy(wide(logits.flatten(0, 1)), pixels.flatten().long(), reduction="none")
    m = mask.reshape(ce.shape).to(ce.dtype)
    count = m.view(mask.shape).sum(1)
    per_image = (ce * m).view(mask.shape).sum(1) / count.clamp_min(1.0)
    return per_image.sum() / (count > 0).sum().clamp_min(1)


def scored_images(pixels: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many images of a batch its loss averages over (``ar_loss``: all; ``bert_loss``: those with a masked
    position): the weight that combines batch losses into a mean over images."""
    return len(pixels) if mask is None else int(mask.reshape(len(pixels), -1).any(1).sum())


# -- modules ------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ImageGPTConfig):
        super().__init__()
        self.n_head, self.causal, self.dropout = cfg.n_head, cfg.causal, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q | k | v, head j owns columns j*hd..
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d); with ``norm``, attention over norm(x) (folded into c_attn)."""
        B, T, C = x.shape
        qkv = self.c_attn(x) if norm is None else norm_linear(x, norm, self.c_attn.weight, self.c_attn.bias)
        qkv = qkv.view(B, T, 3, self.n_head, C // self.n_head)
        # (B, H, T, hd) views. Unbinding dim 2 lets the backward stack SDPA's (B, T, H, hd)-laid-out gradients
        # straight into c_attn's output layout (no zero-fill + copy as indexing has, no extra permute copy).
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        y = attention(q, k, v, self.causal, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ImageGPTConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d) = c_proj(quick_gelu(c_fc(x))); with ``norm``, of norm(x) (folded into c_fc)."""
        # quick_gelu(z) = silu(1.702 z) / 1.702, the two scalings applied to the (small) weights rather than to
        # (N, 4d) activations: one fused elementwise kernel each way.
        w1, b1 = self.c_fc.weight * GELU_SCALE, self.c_fc.bias * GELU_SCALE
        w2, b2 = self.c_proj.weight / GELU_SCALE, self.c_proj.bias
        z = F.linear(x, w1, b1) if norm is None else norm_linear(x, norm, w1, b1)  # (B, T, 4d)
        if (torch.is_grad_enabled() and z.numel() >= RECOMPUTE_NUMEL and not torch.is_autocast_enabled(x.device.type)
                and not torch.compiler.is_compiling()):  # eager only (see rms_norm)
            y = silu_linear(z.reshape(-1, z.shape[-1]), w2, b2).view(x.shape)  # saves silu(z)'s memory
        else:  # small (the recompute would cost ~3% of a step), inference, or autocast (casts left to F.linear)
            y = F.linear(F.silu(z), w2, b2)
        return F.dropout(y, self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ImageGPTConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        x = x + self.attn(x, self.ln_1)  # = attn(ln_1(x)), the norm folded into c_attn
        return x + self.mlp(x, self.ln_2)


class ImageGPT(nn.Module):
    """forward(idx (B, T) long, mask (B, T) bool | None) -> logits (B, T, palette_size).

    ``idx`` is the input sequence: ``ar_inputs(pixels)`` in AR mode, the pixels themselves in BERT mode
    (``mask`` then zeroes the token embedding of masked positions). T may be shorter than n_px ** 2.
    """

    def __init__(self, cfg: ImageGPTConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = activation_checkpointing  # recompute each block in backward
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.palette_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 / paper init: N(0, 0.02) weights (wpe 0.01 as OpenAI's code), zero biases, unit norm gains,
        residual projections (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2 * n_layer), zero logit head."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p.fill_(1.0)
            elif name.endswith(".bias") or name == "lm_head.weight":
                p.zero_()
            elif name == "wpe.weight":
                p.normal_(0.0, std / 2)
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                p.normal_(0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) = wte[id] (zeroed where mask) + wpe[pos]."""
        T = idx.shape[1]
        if T > self.config.seq_len:
            raise IgptError(f"sequence of {T} tokens is longer than the model's context {self.config.seq_len}")
        tok = self.wte(idx.long())
        if mask is not None:
            tok = tok.masked_fill(mask.unsqueeze(-1), 0.0)
        x = tok + self.wpe.weight[:T]
        return F.dropout(x, self.config.dropout, self.training)

    def _blocks(self, x: torch.Tensor, stop: int | None = None):
        """Yield the residual stream entering block l for l = 0 .. stop (the last one after block stop-1)."""
        stop = self.config.n_layer if stop is None else stop
        for l in range(stop):  # noqa: E741
            yield x
            blk = self.h[l]
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        yield x

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        *_, x = self._blocks(self.embed(idx, mask))  # the residual after the last block
        return norm_linear(x, self.ln_f, self.lm_head.weight, None)  # (B, T, palette_size) = lm_head(ln_f(x))

    def hidden_states(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """HF ``output_hidden_states`` layout: [embedding, residual after block 1 .. L-1, ln_f(after block L)]."""
        hs = list(self._blocks(self.embed(idx, mask)))
        hs[-1] = self.ln_f(hs[-1])
        return hs

    def features(self, idx: torch.Tensor, layers, mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Pooled probe features {l: (B, d)} for each l in ``layers`` (0 <= l <= n_layer), one forward pass.

        f_l = mean over positions of the normalised residual stream: block l's ln_1 applied to the residual
        entering block l, and ln_f for l = n_layer (the paper's n^l). Blocks deeper than max(layers) are not
        run. ``idx`` as in forward: [SOS, x0 .. x_{T-2}] pools like the paper/TF code, the raw pixels like HF's
        ImageGPTForImageClassification.
        """
        layers = [int(i) for i in layers]
        want, L = sorted(set(layers)), self.config.n_layer
        if not want or want[0] < 0 or want[-1] > L:
            raise IgptError(f"feature layers must be a non-empty subset of 0..{L}, got {layers}")
        out = {}
        for l, x in enumerate(self._blocks(self.embed(idx, mask), stop=want[-1])):  # noqa: E741
            if l in want:
                norm = self.ln_f if l == L else self.h[l].ln_1
                out[l] = norm(x).mean(dim=1)
        return out
