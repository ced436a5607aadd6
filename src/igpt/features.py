"""Probe inputs: pooled per-layer model features and raw-pixel baseline features, from token shards.

Model features come from ``ImageGPT.features`` (mean over positions of the normalised residual stream), all
requested layers from one forward pass per batch, the blocks above the deepest one never run. AR models get
[SOS, x0 .. x_{n-2}] as input (the paper's / OpenAI's pooling), BERT models the unmasked pixels.
Features can be cached as .npy files (no pickle), keyed by the weights file and the shards.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from igpt.errors import IgptError
from igpt.io import atomic_write_bytes, read_json
from igpt.model import ar_inputs
from igpt.shards import check_ids


@torch.no_grad()
def extract_features(model, tokens: np.ndarray, layers, batch_size: int = 64, device="cpu") -> dict[int, np.ndarray]:
    """uint16 ids (N, T) -> {layer: float32 (N, d)} in one pass over ``tokens``."""
    cfg = model.config
    layers = sorted({int(x) for x in layers})
    out = {l: np.empty((len(tokens), cfg.n_embd), dtype=np.float32) for l in layers}  # noqa: E741
    for i in range(0, len(tokens), batch_size):
        px = torch.from_numpy(check_ids(np.asarray(tokens[i : i + batch_size]).astype(np.int64), cfg.palette_size))
        px = px.to(device)  # (B, T)
        idx = ar_inputs(px, cfg.sos_id) if cfg.mode == "ar" else px
        for l, f in model.features(idx, layers).items():  # noqa: E741
            out[l][i : i + len(px)] = f.float().cpu().numpy()  # (B, d)
    return out


def pixel_features(tokens: np.ndarray, palette) -> np.ndarray:
    """uint16 ids (N, T) -> float32 (N, T * C) pixel values in [-1, 1]: each id's palette colour (the fallback
    baseline input for shards that keep no pixels from before quantization)."""
    return raw_pixel_features(palette.dequantize(np.asarray(tokens)))  # dequantize: (N, T, C) uint8


def raw_pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W, C) -> float32 (N, H * W * C) pixel values in [-1, 1] (the raw-pixel baseline)."""
    x = np.asarray(images, dtype=np.float32)
    return (x.reshape(len(x), -1) / 127.5 - 1.0).astype(np.float32)


def concat_layers(feats: dict[int, np.ndarray], centre: int, k: int) -> tuple[list[int], np.ndarray]:
    """Features of the up to 2k + 1 available layers centre-k .. centre+k, concatenated along the feature axis."""
    ls = [l for l in range(max(centre - k, min(feats)), min(centre + k, max(feats)) + 1) if l in feats]  # noqa: E741
    return ls, np.concatenate([feats[i] for i in ls], axis=1)


def draw_per_class(labels: np.ndarray, k: int, seed: int, n_classes: int | None = None) -> np.ndarray:
    """Sorted indices of exactly ``k`` examples of every class (0 .. n_classes - 1, or those present in
    ``labels``), drawn without replacement by a generator seeded with (seed, k). A class with fewer than k
    examples (none included) is an error."""

    labels = np.asarray(labels)
    order = np.random.default_rng([seed, k]).permutation(len(labels))  # one order for every class: the draw
    picks = []  # of a class does not depend on how the classes are numbered
    for c in np.unique(labels) if n_classes is None else range(n_classes):
        where = order[labels[order] == c]
        if len(where) < k:
            raise IgptError(f"low-data protocol: class {c} has {len(where)} training examples, fewer than {k}")
        picks.append(where[:k])
    return np.sort(np.concatenate(picks))


def cache_keys(checkpoint: str | Path, shards, splits) -> dict[str, dict]:
    """What the cached features of each split depend on: the model (its weights file's content hash and its
    config; hashed once for all splits) and the split's tokens (the file's content hash: shards prepared anew at
    the same path with as many images are other data), with the palette. Path, size and mtime alone could not
    tell a checkpoint of the same shape copied over with its timestamp (`cp -p`, `rsync -a`, an archive) from
    the one the cache was made for. Only for a cache: the hashes read every byte of those files."""
    cfg = Path(checkpoint) / "config.json"
    model = {"weights_sha256": file_sha256(Path(checkpoint) / "model.safetensors"),
             "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None}
    return {s: {**model, "tokens_sha256": file_sha256(Path(shards.root) / f"{s}_tokens.npy"),
                "palette_sha256": shards.palette.hash, "count": int(shards.meta["counts"][s]), "split": s}
            for s in splits}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks (~1-2 s per GB: small beside extracting features)."""
    h = hashlib.sha256()
    try:  # a missing checkpoint or shard file: one line (the key is made before the model is read)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    except OSError as e:
        raise IgptError(f"{path}: unreadable ({e.strerror or e})") from None
    return h.hexdigest()


def _read_cached(f: Path, rows: int) -> np.ndarray | None:
    """A cached feature array (rows, d) float32, or None when it is missing or damaged (it is then recomputed:
    a truncated file was a traceback)."""
    try:  # read_array, not np.load: a zip (an .npz) under the name is not an array either
        with open(f, "rb") as fh:
            x = np.lib.format.read_array(fh, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    ok = x is not None and x.ndim == 2 and len(x) == rows and x.dtype == np.float32
    return x if ok else None


def cached_features(model, tokens, layers, batch_size: int, device, cache_dir: Path | None, key: dict | None):
    """extract_features, reusing CACHE_DIR/{split}_layer{l}.npy written for the same ``key`` (missing layers
    are computed in one pass and added). cache_dir None: no cache (and no key needed)."""
    if cache_dir is None:
        return extract_features(model, tokens, layers, batch_size, device)
    split = key["split"]
    key_file = cache_dir / f"{split}_key.json"
    try:  # a damaged key file: not the same key (the features are recomputed)
        same = key_file.is_file() and read_json(key_file) == key
    except IgptError:
        same = False
    path = lambda l: cache_dir / f"{split}_layer{l}.npy"  # noqa: E731, E741
    have = {l: f for l in layers if same and (f := _read_cached(path(l), len(tokens))) is not None}  # noqa: E741
    todo = [l for l in layers if l not in have]  # noqa: E741
    if todo:
        new = extract_features(model, tokens, todo, batch_size, device)
        if not same:  # the old key goes first: a run killed below must not leave new files under it
            key_file.unlink(missing_ok=True)
            for old in cache_dir.glob(f"{split}_layer*.npy"):
                old.unlink()
        for l, f in new.items():  # noqa: E741
            buf = io.BytesIO()
            np.save(buf, f, allow_pickle=False)
            atomic_write_bytes(path(l), buf.getvalue())
        atomic_write_bytes(key_file, (json.dumps(key, indent=2) + "\n").encode())
        have.update(new)
    return {l: have[l] for l in sorted(layers)}  # noqa: E741
