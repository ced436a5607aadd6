"""Named model sizes. ``get_preset(name, **overrides)`` returns a validated ImageGPTConfig.

Parameter counts (ImageGPT(cfg).num_params(), 512-colour palette, biases and the untied head included;
tests/test_model.py checks igpt-s):
  igpt-s   24 layers,  512 wide,  8 heads, 32x32:    76,682,240  (paper: 76M)
  igpt-m   36 layers, 1024 wide,  8 heads, 32x32:   455,489,536  (paper: 455M)
  igpt-l   48 layers, 1536 wide, 16 heads, 32x32: 1,362,914,304  (paper: 1362M)
  igpt-xl  60 layers, 3072 wide, 24 heads, 64x64: 6,812,534,784  (paper: 6801M; head count unpublished:
           24 is our choice, giving head_dim 128 like iGPT-M. The count does not depend on it.)
"""

from __future__ import annotations

from igpt.errors import IgptError
from igpt.model import ImageGPTConfig

PRESETS: dict[str, dict] = {
    # Unit tests: a model that runs a forward pass in milliseconds.
    "tiny": dict(n_px=8, palette_size=16, n_embd=32, n_layer=2, n_head=2),
    # CPU-sized: 16x16 (e.g. MNIST / grey data, palette_size overridden to the data's), ~0.96M parameters.
    "cpu-small": dict(n_px=16, palette_size=512, n_embd=128, n_layer=4, n_head=4),
    # CPU-sized at the paper's 32x32 resolution, ~6.8M parameters (about 2k tokens/s of training on 2 cores).
    "cpu-base": dict(n_px=32, palette_size=512, n_embd=256, n_layer=8, n_head=8),
    # The paper's models (Chen et al. 2020, Table/§3.3).
    "igpt-s": dict(n_px=32, palette_size=512, n_embd=512, n_layer=24, n_head=8),
    "igpt-m": dict(n_px=32, palette_size=512, n_embd=1024, n_layer=36, n_head=8),
    "igpt-l": dict(n_px=32, palette_size=512, n_embd=1536, n_layer=48, n_head=16),
    "igpt-xl": dict(n_px=64, palette_size=512, n_embd=3072, n_layer=60, n_head=24),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides) -> ImageGPTConfig:
    """The named preset with ``overrides`` (any ImageGPTConfig field) applied; validated."""
    if name not in PRESETS:
        raise IgptError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ImageGPTConfig.from_dict({**PRESETS[name], **overrides})
