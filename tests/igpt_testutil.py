"""Shared helpers for the tests: tiny random models (ours and transformers'), and a two-rank torchrun launcher."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import numpy as np
import torch

from igpt.model import ImageGPT, ImageGPTConfig

# (n_px, n_embd, n_layer, n_head, palette_size): odd head counts and head_dims that are not perfect squares
PARITY_CONFIGS = [
    (8, 24, 2, 3, 16),  # 3 heads, head_dim 8
    (16, 36, 2, 6, 32),  # 6 heads, head_dim 6
    (8, 40, 3, 5, 10),  # 5 heads, head_dim 8
    (16, 48, 1, 4, 20),  # head_dim 12
    (8, 27, 2, 3, 16),  # head_dim 9: a perfect square, so it runs even against a mis-scaling transformers
    (16, 64, 2, 4, 24),  # head_dim 16
]


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> torch.nn.Module:
    """Every parameter random (norm gains around 1, biases and the head non-zero) so parity tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if ("ln_" in name and p.ndim == 1) else noise * (4 if "wte" in name or "wpe" in name else 1))
    return model


def tiny_config(**kw) -> ImageGPTConfig:
    base = dict(n_px=8, palette_size=16, n_embd=24, n_layer=2, n_head=3)
    return ImageGPTConfig(**{**base, **kw})


def tiny_model(seed: int = 0, **kw) -> ImageGPT:
    return randomize_(ImageGPT(tiny_config(**kw)), seed).eval()


def hf_model(n_px, n_embd, n_layer, n_head, palette_size, seed=0, cls_name="ImageGPTForCausalImageModeling", **kw):
    import transformers

    hc = transformers.ImageGPTConfig(vocab_size=palette_size + 1, n_positions=n_px * n_px, n_embd=n_embd,
                                     n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, **kw)
    return randomize_(getattr(transformers, cls_name)(hc), seed).eval()


def rgb_palette(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(k, 3)).astype(np.float32)


def grey_palette(k: int) -> np.ndarray:
    return np.linspace(-1, 1, k, dtype=np.float32)[:, None]


@functools.cache
def hf_attention_scale() -> str:
    """How the installed transformers scales ImageGPT attention: 'float' (1/sqrt(hd), correct), 'int'
    (1/int(sqrt(hd)): the known bug of 4.42-4.46.x, also seen in 5.17), or 'unknown'. Checked against a
    formula written here, independent of igpt's code, with head_dim 8."""
    import transformers
    from transformers.models.imagegpt.modeling_imagegpt import ImageGPTAttention

    cfg = transformers.ImageGPTConfig(n_embd=8, n_head=1, n_positions=5, attn_pdrop=0.0, resid_pdrop=0.0)
    att = randomize_(ImageGPTAttention(cfg, layer_idx=0), seed=0, std=0.5).eval()
    x = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = att(x)[0]
        q, k, v = (x @ att.c_attn.weight + att.c_attn.bias).split(8, dim=-1)
        for name, scale in (("float", 8**-0.5), ("int", 1 / int(8**0.5))):
            s = (q @ k.transpose(-1, -2) * scale).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -1e30)
            ref = torch.softmax(s, -1) @ v @ att.c_proj.weight + att.c_proj.bias
            if (ref - out).abs().max() < 1e-5:
                return name
    return "unknown"


def require_correct_hf_scale(head_dim: int) -> None:
    """Skip a parity test whose head_dim is not a perfect square when the installed transformers has the
    1/int(sqrt(head_dim)) bug: it is the reference that is wrong there (tests with square head_dims still run)."""
    import pytest
    import transformers

    if math.isqrt(head_dim) ** 2 != head_dim and hf_attention_scale() == "int":
        pytest.skip(f"transformers {transformers.__version__} scales attention by 1/int(sqrt(head_dim)); "
                    "install the pinned transformers==5.24.0 to compare head_dim " + str(head_dim))


def torchrun(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (gloo on this host; one thread per rank), its output
    captured. --standalone lets the rendezvous bind a port of its own choosing: a port found free by binding a
    socket first and closing it could be taken by another process before torchrun bound it. The timeout is a
    guard against a hung rank, far above a normal run's seconds (a loaded CI machine is slower)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env)
