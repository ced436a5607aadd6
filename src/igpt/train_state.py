"""Training checkpoints: a model checkpoint directory plus what an exact resume needs.

    RUN/checkpoints/
      step-000100/          a model checkpoint (model.safetensors, config.json, palette.npy; `igpt sample` reads it)
        optimizer.pt        AdamW's full (unsharded) state dict, parameter names as keys
        rng.pt              every RNG state of every rank (python, numpy, torch CPU, CUDA)
        train_state.json    step, tokens seen, data position, world size, the resolved train config (written last)
      latest                the name of the newest complete checkpoint, updated after it is in place
Each checkpoint directory appears in one rename (igpt.io.atomic_dir), so a crash never leaves one that loads:
loading requires train_state.json, and temporary directories start with '.'. Old checkpoints leave the same
way (renamed to a hidden name, then deleted), and the next save removes what a killed process left behind.
``.pt`` files hold only tensors, numbers, strings and lists, and are loaded with ``torch.load(weights_only=True)``.
The model and optimizer states are full (gathered) ones, so a run saved by W ranks, with DDP or FSDP2, resumes
on any number of ranks.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from igpt.checkpoint import (
    MODEL_FILE,
    build_model,
    read_config,
    read_pt,
    read_tensors,
    write_model_files,
    write_torch,
)
from igpt.errors import IgptError
from igpt.io import atomic_dir, atomic_write_bytes, read_json

OPTIM_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "train_state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# temporaries of igpt.io (".step-000010.x1y2.tmp", ".latest.x1y2.tmp"), directories moved aside or being
# deleted (".step-000010.old-123", ".step-000010.deleting")
_LEFTOVER = re.compile(r"^\.(step-\d+|latest)\..+\.(tmp|deleting)$|^\.step-\d+\.old-\d+$|^\.step-\d+\.deleting$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states, as tensors / ints / lists only (safe for weights_only loading); with a CUDA
    ``device``, also that device's generator (not the current device's: a 1-process run on cuda:1)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    st = {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                           has_gauss, gauss], "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _restore(st: dict, py, npr, torch_set, cuda: torch.device | None, source: str) -> None:
    """Apply saved states to the given generators (the process's, or throw-away ones to check them)."""
    try:
        v, keys, g = st["python"]
        py.setstate((v, tuple(keys), g))
        kind, keys, pos, has_gauss, gauss = st["numpy"]
        npr.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch_set(st["torch"])
        if cuda is not None and cuda.type == "cuda" and "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"], cuda)
    except (TypeError, ValueError, RuntimeError, OverflowError, KeyError, IndexError, AttributeError) as e:
        raise IgptError(f"{source}: damaged RNG state ({type(e).__name__}: {e})") from None


def set_rng_state(st: dict, source: str = "the checkpoint", device: torch.device | None = None) -> None:
    """Restore what rng_state(device) saved; IgptError naming ``source`` when the saved states are damaged."""
    _restore(st, random, np.random, torch.set_rng_state, device, source)


def check_rng_state(st: dict, source: str) -> None:
    """IgptError naming ``source`` unless ``st`` applies cleanly, tried on throw-away generators (so a damaged
    state makes its checkpoint unreadable when it is loaded, and ``--resume auto`` falls back)."""
    py = random.Random()  # noqa: S311 - a scratch generator to try the state on, not for secrets
    _restore(st, py, np.random.RandomState(), torch.Generator().set_state, None, source)


def save_train_checkpoint(ckpt_root: Path, model_state: dict, model_cfg, palette, optim_state: dict,
                          rngs: list[dict], meta: dict, keep: int) -> Path:
    """Write step-NNNNNN (call on rank 0 only, with gathered states), then point ``latest`` at it, then delete
    all but the newest ``keep`` checkpoints. Returns the checkpoint directory."""
    path = ckpt_root / step_dir_name(meta["step"])
    with atomic_dir(path, follow_symlink=False) as tmp:
        write_model_files(tmp, model_state, model_cfg, palette)
        write_torch(optim_state, tmp / OPTIM_FILE)
        write_torch({"ranks": rngs}, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    atomic_write_bytes(ckpt_root / LATEST, (path.name + "\n").encode())  # only after the directory is in place
    prune(ckpt_root, keep, path)
    remove_leftovers(ckpt_root)
    return path


def prune(ckpt_root: Path, keep: int, spare: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints, never ``spare`` (the one just written, or resumed from:
    newer ones of another branch would otherwise outlive it). Call on rank 0 only."""
    for old in list_checkpoints(ckpt_root)[:-keep]:
        if old != spare:
            _remove(old)


def remove_leftovers(ckpt_root: Path) -> None:
    """Delete what a killed save left under ``ckpt_root``: temporary or half-deleted directories (hidden names
    that no reader lists). Call on rank 0 only, with no other save in progress."""
    for junk in ckpt_root.glob(".*"):
        if _LEFTOVER.match(junk.name):
            _remove(junk)


def _remove(path: Path) -> None:
    """Delete a checkpoint directory so that no reader ever sees half of it: rename it to a hidden name (one
    atomic step that takes it out of ``list_checkpoints``), then delete that."""
    if not path.name.startswith("."):
        hidden = path.with_name(f".{path.name}.deleting")
        try:
            os.replace(path, hidden)
        except OSError:
            return
        path = hidden
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:  # a file, or a link (to a folder: the link alone goes)
        path.unlink(missing_ok=True)


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (MODEL_FILE, OPTIM_FILE, RNG_FILE, STATE_FILE))


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint directory from its name (step-NNNNNN); None for another name."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint; None if none. ``latest`` is for readers (people, scripts): a process
    killed between a checkpoint's rename and the pointer's update leaves it one behind, and a complete
    directory is all a resume needs, so the directories decide."""
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_newest(ckpt_root: Path, model_cfg, load=None) -> tuple[Path, dict, list[tuple[Path, str]]] | None:
    """(path, state, skipped) of the newest complete checkpoint that loads (with ``load``, by default
    ``load_train_checkpoint``), the newer ones that did not and why; None if there is no checkpoint. When none
    loads, the newest's error."""
    load = load or load_train_checkpoint
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return path, load(path, model_cfg), skipped
        except IgptError as e:
            skipped.append((path, str(e)))
    if skipped:
        raise IgptError(f"{skipped[0][1]} (no older checkpoint under {ckpt_root} loads either)")
    return None


def set_aside(path: Path, current: Path) -> Path:
    """Rename a checkpoint that does not load to ``step-NNNNNN.unreadable[-k]`` (kept for inspection, no longer
    listed, never pruned, its step number free to be written again) and point ``latest`` at ``current``, the
    checkpoint the run resumed from. Returns the new path."""
    target = path.with_name(path.name + ".unreadable")
    k = 1
    while target.exists():
        target, k = path.with_name(f"{path.name}.unreadable-{k}"), k + 1
    path.rename(target)
    atomic_write_bytes(path.parent / LATEST, (current.name + "\n").encode())
    return target


def _meta_ok(meta: dict) -> bool:
    """train_state.json's fields have the types igpt writes (a damaged one failed later, some after a step
    had been computed: a string best_val_loss, shards that were not a table, a negative step)."""
    step, best = meta.get("step"), meta.get("best_val_loss")
    return (isinstance(step, int) and not isinstance(step, bool) and step >= 0
            and isinstance(meta.get("train_config"), dict)
            and (best is None or (isinstance(best, int | float) and not isinstance(best, bool)))
            and isinstance(meta.get("shards", {}), dict) and isinstance(meta.get("dtype", ""), str))


def load_train_checkpoint(path: Path, model_cfg) -> dict:
    """{'model': state dict, 'optim': state dict, 'rng': [per-rank states], 'meta': dict}; IgptError when the
    directory is incomplete or holds a model of another shape than ``model_cfg``."""
    path = Path(path)
    if not is_complete(path):
        raise IgptError(f"{path}: not a complete training checkpoint (needs {MODEL_FILE}, {OPTIM_FILE}, "
                        f"{RNG_FILE}, {STATE_FILE})")
    saved = read_config(path)
    if saved != model_cfg:
        diff = {k: (v, getattr(model_cfg, k)) for k, v in saved.to_dict().items() if getattr(model_cfg, k) != v}
        raise IgptError(f"{path}: checkpoint of another model (saved vs now: {diff})")
    state = build_model(saved, read_tensors(path / MODEL_FILE), str(path / MODEL_FILE)).state_dict()
    optim, rng = read_pt(path / OPTIM_FILE), read_pt(path / RNG_FILE)
    meta = read_json(path / STATE_FILE)
    if not (isinstance(optim, dict) and isinstance(rng, dict) and isinstance(rng.get("ranks"), list)
            and isinstance(meta, dict) and _meta_ok(meta)):
        raise IgptError(f"{path}: unreadable training checkpoint (optimizer.pt, rng.pt or train_state.json is "
                        "not what igpt writes)")
    if not rng["ranks"]:  # resuming indexes it (an IndexError traceback)
        raise IgptError(f"{path / RNG_FILE}: holds no RNG state")
    for i, st in enumerate(rng["ranks"]):
        check_rng_state(st, f"{path / RNG_FILE} (rank {i})")
    try:  # Adam's state must be whole and fit the parameters (a damaged file would otherwise fail at the first
        _check_optimizer(optim, state)  # step, or, missing a moment or a step count, silently train another run)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise IgptError(f"{path / OPTIM_FILE}: does not fit the model ({type(e).__name__}: {e})") from None
    return {"model": state, "optim": optim, "rng": rng["ranks"], "meta": meta}


def _is_real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_optimizer(optim: dict, params: dict) -> None:
    """ValueError unless ``optim`` is the full AdamW state dict igpt saves for parameters ``params``: a state per
    parameter (every parameter has a gradient at every step) with a finite step count and both moments as float
    tensors of its shape, and parameter groups with numeric hyperparameters."""
    states, groups = optim["state"], optim["param_groups"]
    if not isinstance(states, dict) or not isinstance(groups, list) or not groups:
        raise ValueError("state is not a table or param_groups not a non-empty list")
    if set(states) != set(params):
        raise ValueError(f"state for {sorted(set(states) ^ set(params))[:5]} does not match the parameters")
    for name, st in states.items():
        step = st["step"]
        step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if not _is_real(step) or step < 1:
            raise ValueError(f"{name}.step is {step!r}, not a step count")
        for k in ("exp_avg", "exp_avg_sq"):
            t = st[k]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{name}.{k} is not a float tensor")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}.{k} has shape {tuple(t.shape)}, the parameter {tuple(params[name].shape)}")
    for g in groups:
        betas = g.get("betas", (0.9, 0.999))  # (a group is a table: g.get raises AttributeError otherwise)
        if not (all(_is_real(g.get(k, 0.0)) for k in ("lr", "eps", "weight_decay"))
                and isinstance(betas, list | tuple) and len(betas) == 2 and all(_is_real(b) for b in betas)):
            raise ValueError("a parameter group's lr, betas, eps or weight_decay is not a number")
