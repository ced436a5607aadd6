"""Model checkpoints: a directory holding everything needed to rebuild and reuse the model.

    CKPT/
      model.safetensors   the ImageGPT state dict (our parameter names, nn.Linear layout)
      config.json         ImageGPTConfig.to_dict()
      palette.npy         the palette (k, C) in [-1, 1], when known (+ palette.json, its sidecar)
      heads.safetensors   optional extra heads, e.g. {"score": (num_labels, d)} from an HF classifier

Writes are atomic: the files go into a temporary directory beside CKPT (each fsynced) which then takes
CKPT's place, so a reader sees the old checkpoint or the new one, never a mix. Loading reads safetensors
only (no pickle) and validates the config and every tensor's name and shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from igpt.errors import IgptError
from igpt.io import atomic_dir, check_replaceable, chmod_default, read_json
from igpt.model import ImageGPT, ImageGPTConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PALETTE_FILE = "palette.npy"
HEADS_FILE = "heads.safetensors"


def save_model(path: str | Path, model: ImageGPT, palette=None, heads: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (and ``palette``: a Palette or (k, C) array; ``heads``: extra tensors) to directory
    ``path`` atomically, replacing an older checkpoint there. Returns the path."""
    from igpt.palette import Palette

    path = Path(path)
    check_replaceable(path, {CONFIG_FILE: "palette_size"})
    cfg = model.config
    pal = None
    if palette is not None:
        pal = palette if isinstance(palette, Palette) else Palette(np.asarray(palette))
        if pal.k != cfg.palette_size:
            raise IgptError(f"palette has {pal.k} colours but the model has palette_size {cfg.palette_size}")
    with atomic_dir(path) as tmp:
        write_model_files(tmp, model.state_dict(), cfg, pal, heads)
    return path


def write_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its write errors (a full disk: SafetensorError, not OSError) as OSError naming
    the file, which the commands report in one line."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"cannot write {path}: {e}") from None


def write_torch(obj, path: Path) -> None:
    """torch.save (of tensors and plain containers only); a failed write (a full disk raises RuntimeError
    'unexpected pos ...') as OSError naming the file."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or ["RuntimeError"])[0]
        raise OSError(f"cannot write {path}: {first} (is the disk full?)") from None


def write_model_files(folder: Path, state: dict[str, torch.Tensor], cfg: ImageGPTConfig, palette=None,
                      heads: dict[str, torch.Tensor] | None = None) -> None:
    """The model checkpoint's files (weights, config, palette, heads) into ``folder``, which the caller makes
    visible atomically (training checkpoints add their own files beside these)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    write_safetensors(state, folder / MODEL_FILE, metadata={"format": "pt"})
    chmod_default(folder / MODEL_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if palette is not None:
        palette.save(folder / PALETTE_FILE)
    if heads:
        write_safetensors({k: v.detach().to("cpu").contiguous() for k, v in heads.items()}, folder / HEADS_FILE)
        chmod_default(folder / HEADS_FILE)


def read_config(path: str | Path) -> ImageGPTConfig:
    """The validated ImageGPTConfig of checkpoint directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise IgptError(f"checkpoint not found: {path} (a checkpoint is a directory with {MODEL_FILE} and {CONFIG_FILE})")
    f = path / CONFIG_FILE
    if not f.is_file():
        raise IgptError(f"{f}: missing (is {path} a checkpoint directory?)")
    d = read_json(f)
    if isinstance(d, dict) and "train" in d and "model" in d and (path / "checkpoints").is_dir():
        steps = sorted(p.name for p in (path / "checkpoints").glob("step-*") if p.is_dir())
        raise IgptError(f"{path} is a training run, not a checkpoint; its checkpoints are "
                        f"{path / 'checkpoints'}/step-NNNNNN" + (f" (the newest: {steps[-1]})" if steps else ""))
    try:
        return ImageGPTConfig.from_dict(d)
    except (IgptError, TypeError) as e:
        raise IgptError(f"{f}: {e}") from None


def read_tensors(f: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of safetensors file ``f``; IgptError naming the file when it is missing or corrupt."""
    if not f.is_file():
        raise IgptError(f"{f}: missing")
    try:
        return load_file(str(f), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IgptError(f"{f}: corrupt or not a safetensors file ({e})") from None


def read_pt(f: Path):
    """``torch.load(f, weights_only=True)``: tensors and plain containers only. A pickled object that could run
    code, or a damaged file, is refused with an IgptError naming the file (torch's unpickler raises many
    exception types on damaged input, AssertionError among them)."""
    import pickle  # noqa: S403 - only for its exception type

    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, ValueError, RuntimeError, KeyError, EOFError, AttributeError,
            TypeError, IndexError, UnicodeDecodeError, AssertionError, OverflowError, MemoryError,
            RecursionError) as e:
        text = str(e).strip()
        why = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise IgptError(f"{f}: refused or unreadable with torch.load(weights_only=True) "
                        f"({why or (text.splitlines()[0][:200] if text else type(e).__name__)})") from None


def build_model(cfg: ImageGPTConfig, state: dict[str, torch.Tensor], source: str) -> ImageGPT:
    """ImageGPT(cfg) holding ``state`` (tensors adopted, not copied); IgptError listing any missing, unknown
    or misshapen tensor, naming ``source``."""
    _check_sizes(cfg, state, source)
    with torch.device("meta"):
        model = ImageGPT(cfg)
    want = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(state))
    unknown = sorted(set(state) - set(want))
    if missing or unknown:
        raise IgptError(f"{source}: tensors do not match the config; missing {missing or 'none'}, "
                        f"unknown {unknown or 'none'}")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in want.items() if state[k].shape != s]
    if bad:
        raise IgptError(f"{source}: wrong tensor shapes: {', '.join(bad)}")
    state = _one_float_dtype(state, source)
    model.load_state_dict(state, assign=True)
    return model.eval()


def _check_sizes(cfg: ImageGPTConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Before any module is built: the config must not need far more numbers than the file holds (a config
    claiming 100,000 layers ran for minutes building them; a width of 2^62 overflowed torch with a C++ trace).
    A lower bound of the parameter count (the blocks' matrices and the position table) against 16x the file's;
    closer mismatches are listed tensor by tensor once the (meta) model exists."""
    need = cfg.n_layer * 12 * cfg.n_embd**2 + cfg.seq_len * cfg.n_embd
    held = sum(t.numel() for t in state.values())
    if need > 16 * held:
        raise IgptError(f"{source}: the config ({cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.seq_len} "
                        f"positions) needs at least {need:,} numbers; the file holds {held:,}")


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _one_float_dtype(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` with every tensor in one float dtype: a forward pass cannot mix them. A checkpoint saved in
    one dtype (float32, or a bf16 / fp16 model) keeps it; a mix is converted to float32 (float64 narrowed). Integer (or other)
    tensors are refused: they are not weights."""
    bad = [f"{k} ({v.dtype})" for k, v in state.items() if v.dtype not in FLOAT_DTYPES]
    if bad:
        raise IgptError(f"{source}: tensors that are not float32, bfloat16, float16 or float64: {', '.join(bad)}")
    if len({v.dtype for v in state.values()}) > 1:
        state = {k: v.float() for k, v in state.items()}
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Checkpoint directory -> (ImageGPT in eval mode on ``device``, Palette or None)."""
    from igpt.palette import Palette

    path = Path(path)
    cfg = read_config(path)
    model = build_model(cfg, read_tensors(path / MODEL_FILE, device), str(path / MODEL_FILE))
    palette = None
    if (path / PALETTE_FILE).exists():
        palette = Palette.load(path / PALETTE_FILE)
        if palette.k != cfg.palette_size:
            raise IgptError(f"{path / PALETTE_FILE}: {palette.k} colours, but the model has {cfg.palette_size}")
    return model, palette


def load_heads(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Extra heads saved with the checkpoint ({} when there are none)."""
    f = Path(path) / HEADS_FILE
    return read_tensors(f, device) if f.exists() else {}
