"""Colour palettes: k-means clusters in [-1, 1], quantize (pixels -> ids) and dequantize (ids -> pixels).

Layout follows OpenAI's ``kmeans_centers.npy``: an array (k, C) of cluster centres in [-1, 1], where a pixel
value v in 0..255 sits at v / 127.5 - 1. A palette of RGB colours has C = 3 (512 colours = the paper's
"9-bit" palette); a grey palette has C = 1. Fitting one (k-means) lives in ``igpt.kmeans``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from igpt.errors import IgptError
from igpt.io import NPY_ERRORS, atomic_write_bytes, check_npy_file

_MISSING = np.uint16(0xFFFF)  # lookup-table entry not computed yet; so ids must stay below 65535
_CHUNK = 16384  # colours per distance block: (16384, k) float64 is 64 MiB at k = 512
_MAX_FILE = 2 << 20  # bytes: the largest palette (65534 colours x 3 float64s) is 1.5 MiB


def to_unit(values: np.ndarray) -> np.ndarray:
    """uint8 pixel values -> float64 in [-1, 1] (v / 127.5 - 1), the space palettes live in."""
    return np.asarray(values, dtype=np.float64) / 127.5 - 1.0


def channel_name(c: int) -> str:
    return {1: "grey", 3: "RGB"}.get(c, f"{c}-channel")


def pack_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> int32 (...) codes r << 16 | g << 8 | b, the index into a 2^24 lookup table (int32: half
    the memory traffic of int64, 12 against 17 ms for 2M pixels)."""
    p = np.asarray(pixels)
    codes = p[..., 0].astype(np.int32) << 16
    codes |= p[..., 1].astype(np.int32) << 8
    codes |= p[..., 2]
    return codes


def nearest(points: np.ndarray, centres: np.ndarray, margin: float = 1e-4) -> np.ndarray:
    """Index of the nearest centre for each point, squared Euclidean distance, ties to the lowest index.

    points: (N, C) float64; centres: (k, C). A float32 pass finds the nearest centre; rows whose best two
    distances lie within ``margin`` (far above float32 rounding, ~1e-6 here) are decided again in float64 with
    the expanded form |a|^2 - 2ab + |b|^2 that the ``transformers`` ImageGPT processor uses, so ids agree with
    it except at exact ties.
    """
    c = np.asarray(centres, dtype=np.float64)
    c2 = np.einsum("kc,kc->k", c, c)
    m2c32, c2_32 = (-2.0 * c.T).astype(np.float32), c2.astype(np.float32)
    out = np.empty(len(points), dtype=np.int64)
    for s in range(0, len(points), _CHUNK):
        a = points[s : s + _CHUNK]
        d = a.astype(np.float32) @ m2c32  # (n, k); |a|^2 is constant per row and cannot change the argmin
        d += c2_32
        i = d.argmin(axis=1)
        close = (d <= d[np.arange(len(d)), i][:, None] + margin).sum(axis=1) > 1
        if close.any():
            i[close] = (c2[None, :] - 2.0 * (a[close] @ c.T)).argmin(axis=1)
        out[s : s + _CHUNK] = i
    return out


_UNIT = to_unit(np.arange(256))  # every uint8 value in [-1, 1], float64

# the RGB cube's cells for the nearest-colour search: 32 levels a side, 512 cells. With 16 (4,096 cells, ~7 of
# 512 centres each instead of ~28) the per-cell loop and the candidate bounds cost more than the longer
# candidate lists save (a fresh 512-colour table over 1,966 real images on 2 cores: 203 ms against 243, the
# medians of 14 interleaved runs)
CELL = 32


def cell_candidates(centres: np.ndarray) -> np.ndarray:
    """((256 / CELL)^3, k) bool: for each cell of the RGB cube (CELL levels a side), the centres that can be
    nearest to a colour in it: those whose distance to the cell's box is at most the smallest distance any
    centre has to the box's farthest corner (+1e-9, far above the rounding of either form). The nearest centre
    of a colour in the cell always lies among them (about 28 of 512 for a palette fitted to photos)."""
    c = np.asarray(centres, dtype=np.float64)
    n = 256 // CELL
    lo, hi = to_unit(np.arange(n) * CELL), to_unit(np.arange(n) * CELL + CELL - 1)  # per axis, (n,)
    dmin, dmax = np.zeros((n, n, n, len(c))), np.zeros((n, n, n, len(c)))
    for a in range(3):
        ca = c[:, a][None, :]
        near = (np.maximum(lo[:, None] - ca, 0) + np.maximum(ca - hi[:, None], 0)) ** 2  # (n, k)
        far = np.maximum((ca - lo[:, None]) ** 2, (ca - hi[:, None]) ** 2)
        shape = [1, 1, 1, len(c)]
        shape[a] = n
        dmin += near.reshape(shape)
        dmax += far.reshape(shape)
    dmin, dmax = dmin.reshape(n**3, -1), dmax.reshape(n**3, -1)
    return dmin <= dmax.min(axis=1, keepdims=True) + 1e-9


def nearest_rgb(codes: np.ndarray, centres: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``nearest`` for packed RGB codes (N,) (``pack_rgb``), searching each colour's cell's candidates only
    (``cell_candidates``): the same ids (float64, |c|^2 - 2ac + |a|^2's argmin, ties to the lowest index) at
    ~1/10 of the time for k = 512."""
    c = np.asarray(centres, dtype=np.float64)
    c2 = np.einsum("kc,kc->k", c, c)
    m2c = -2.0 * c.T  # (3, k): a @ (-2 c^T) is exactly -2 (a @ c^T) (a power-of-two scale), one pass fewer
    r, g, b = (codes >> 16) & 255, (codes >> 8) & 255, codes & 255
    n = 256 // CELL
    cell = (((r // CELL) * n + g // CELL) * n + b // CELL).astype(np.uint16)
    order = np.argsort(cell, kind="stable")  # a radix sort for 16-bit keys
    cells = cell[order]
    starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    ends = np.r_[starts[1:], len(cells)]
    oc, unit = codes[order], _UNIT  # the points in cell order, each channel through a 256-entry table
    pts = np.empty((len(oc), 3))  # (7 against 13 ms for 341k colours than stacking and scaling them)
    pts[:, 0], pts[:, 1], pts[:, 2] = unit[oc >> 16], unit[(oc >> 8) & 255], unit[oc & 255]
    found = np.empty(len(codes), dtype=np.int64)
    for s, e in zip(starts, ends):
        ids = np.flatnonzero(candidates[cells[s]])  # ascending, so argmin's first minimum is the lowest id
        d = pts[s:e] @ m2c[:, ids]  # (n, m)
        d += c2[ids]  # = c2 - 2 a.c, bit for bit
        found[s:e] = ids[d.argmin(axis=1)]
    out = np.empty(len(codes), dtype=np.int64)
    out[order] = found
    return out


class Palette:
    """k colours in [-1, 1]. ``quantize`` maps uint8 images (..., C) to ids (...); ``dequantize`` inverts.

    RGB quantization goes through a lazily filled 2^24-entry lookup table: each distinct colour is solved
    exactly once (``nearest_rgb``: only the centres that can be nearest in its part of the RGB cube), later
    pixels of that colour cost one gather.
    """

    def __init__(self, centers: np.ndarray):
        centers = np.asarray(centers)
        if centers.ndim != 2 or centers.shape[1] not in (1, 3):
            raise IgptError(f"palette must have shape (k, 1) or (k, 3), got {centers.shape}")
        if not np.issubdtype(centers.dtype, np.floating):
            raise IgptError(f"palette values must be floats in [-1, 1], got dtype {centers.dtype}")
        k = centers.shape[0]
        if not 2 <= k < int(_MISSING):
            raise IgptError(f"palette size must be between 2 and {int(_MISSING) - 1}, got {k}")
        if not np.isfinite(centers).all() or np.abs(centers).max() > 1.0 + 1e-6:
            raise IgptError("palette values must be finite and within [-1, 1]")
        self.centers = centers  # kept in its own dtype: OpenAI's kmeans_centers.npy loads unchanged
        self._colours = np.rint(127.5 * (centers.astype(np.float64) + 1.0)).clip(0, 255).astype(np.uint8)
        self._lut: np.ndarray | None = None
        self._solved = 0  # colours in the RGB lookup table (0: fresh, nothing to look up yet)
        self._candidates: np.ndarray | None = None  # cell_candidates, for RGB

    @property
    def k(self) -> int:
        return self.centers.shape[0]

    @property
    def channels(self) -> int:
        return self.centers.shape[1]

    @property
    def hash(self) -> str:
        """Content hash (sha256 of dtype, shape and values), stored in shards' meta.json and sidecars."""
        h = hashlib.sha256(f"{self.centers.dtype.str}{self.centers.shape}".encode())
        h.update(np.ascontiguousarray(self.centers).tobytes())
        return h.hexdigest()

    def colours(self) -> np.ndarray:
        """The palette as uint8 colours (k, C): rint(127.5 * (c + 1))."""
        return self._colours.copy()

    def check_channels(self, channels: int, what: str = "the data") -> None:
        if channels != self.channels:
            raise IgptError(
                f"palette is {channel_name(self.channels)} ({self.channels} channel(s)) but {what} is "
                f"{channel_name(channels)} ({channels} channel(s))"
            )

    # -- quantize / dequantize ---------------------------------------------------------------------------
    def quantize(self, images: np.ndarray) -> np.ndarray:
        """uint8 (..., C) -> uint16 ids (...): the nearest palette colour of every pixel."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise IgptError(f"quantize expects uint8 pixels, got {images.dtype}")
        if images.ndim == 0 or images.shape[-1] != self.channels:
            got = images.shape[-1] if images.ndim else 0
            self.check_channels(got, f"an array of shape {images.shape}")
        lut = self._table()
        codes = images[..., 0] if self.channels == 1 else pack_rgb(images)
        if self.channels == 3 and not self._solved:  # a fresh table: every colour is new, no lookups to try
            self._solve(codes)
            return lut[codes]
        ids = lut[codes]
        missing = ids == _MISSING
        n_missing = np.count_nonzero(missing)
        if n_missing:
            miss = codes[missing]
            self._solve(miss)
            if 2 * n_missing > missing.size:  # mostly new colours: one plain gather is cheaper
                ids = lut[codes]
            else:
                ids[missing] = lut[miss]
        return ids

    def _solve(self, codes: np.ndarray) -> None:
        """Fill the lookup table for the distinct colours among ``codes`` (RGB)."""
        if not codes.size:
            return
        seen = np.zeros(1 << 24, dtype=bool)  # the distinct codes, sorted: 10x faster than np.unique
        seen[codes] = True
        todo = np.flatnonzero(seen)
        if self._candidates is None:
            self._candidates = cell_candidates(self.centers)
        self._lut[todo] = nearest_rgb(todo, self.centers, self._candidates)
        self._solved += len(todo)

    def dequantize(self, ids: np.ndarray) -> np.ndarray:
        """ids (...) -> uint8 pixels (..., C), each id's colour rint(127.5 * (c + 1))."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.k):
            raise IgptError(f"ids out of range for a palette of {self.k} colours: [{ids.min()}, {ids.max()}]")
        return self._colours[ids]

    def _table(self) -> np.ndarray:
        if self._lut is None:
            if self.channels == 1:  # 256 grey levels: solve them all up front
                self._lut = nearest(to_unit(np.arange(256)[:, None]), self.centers).astype(np.uint16)
            else:
                self._lut = np.full(1 << 24, _MISSING, dtype=np.uint16)  # 32 MiB, filled on demand
        return self._lut

    # -- files -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``path`` (.npy, (k, C)) and the sidecar ``path.with_suffix('.json')``, each atomically."""
        path = Path(path)
        buf = _npy_bytes(self.centers)
        atomic_write_bytes(path, buf)
        side = {"k": self.k, "channels": self.channels, "value_range": [-1.0, 1.0],
                "dtype": self.centers.dtype.name, "sha256": self.hash}
        atomic_write_bytes(path.with_suffix(".json"), (json.dumps(side, indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> Palette:
        """Load a palette: our ``.npy`` (+ sidecar), OpenAI's ``kmeans_centers.npy``, or a Hugging Face
        ``preprocessor_config.json`` (its ``clusters``). A directory is searched for those files."""
        path = Path(path)
        if path.is_dir():
            for name in ("palette.npy", "kmeans_centers.npy", "preprocessor_config.json"):
                if (path / name).is_file():
                    return cls.load(path / name)
            raise IgptError(f"{path}: no palette.npy, kmeans_centers.npy or preprocessor_config.json in it")
        if not path.is_file():
            raise IgptError(f"palette file not found: {path}")
        if path.suffix == ".json":
            try:
                if path.stat().st_size > 64 * _MAX_FILE:  # JSON spells a float in ~20 bytes
                    raise ValueError(f"{path.stat().st_size:,} bytes, too large for a palette")
                d = json.loads(path.read_text())
                clusters, dtype, channels = d.get("clusters"), d.get("igpt_dtype"), d.get("igpt_channels")
            except (ValueError, UnicodeDecodeError, AttributeError, RecursionError) as e:
                raise IgptError(f"{path}: not a readable JSON object ({e})") from None
            if clusters is None:
                raise IgptError(f"{path}: no 'clusters' entry, so it holds no palette")
            try:
                c = np.asarray(clusters, dtype=np.float64)
                if dtype in ("float16", "float32", "float64") and np.array_equal(c.astype(dtype).astype(np.float64), c):
                    c = c.astype(dtype)  # export-hf's record of the palette's own dtype (JSON holds float64 only)
                elif np.array_equal(c.astype(np.float32).astype(np.float64), c):  # float32 numbers (ours exported,
                    c = c.astype(np.float32)  # OpenAI's): the hash, and shards made with it, match the .npy's
            except (TypeError, ValueError, OverflowError, RecursionError) as e:
                raise IgptError(f"{path}: 'clusters' is not a (k, C) list of numbers ({e})") from None
            if channels == 1 and c.ndim == 2 and c.shape[1] == 3:  # export-hf's grey palette, written as RGB greys
                if not (c == c[:, :1]).all():
                    raise IgptError(f"{path}: igpt_channels is 1 but the clusters are not grey (r = g = b)")
                c = c[:, :1]
            try:
                return cls(c)
            except IgptError as e:  # values outside [-1, 1], a wrong shape: name the file, as for a .npy
                raise IgptError(f"{path}: {e}") from None
        try:
            if path.stat().st_size > _MAX_FILE:
                raise IgptError(f"{path}: {path.stat().st_size:,} bytes, too large for a palette")
            check_npy_file(path)  # object arrays, and headers that claim more than the file holds
            centers = np.load(path, allow_pickle=False)
        except (IgptError, *NPY_ERRORS) as e:
            raise IgptError(f"{path}: not a readable .npy palette ({e})") from None
        try:
            pal = cls(centers)
        except IgptError as e:
            raise IgptError(f"{path}: {e}") from None
        side = path.with_suffix(".json")
        if side.is_file():
            try:
                want = json.loads(side.read_text()).get("sha256")
            except (OSError, ValueError, UnicodeDecodeError, AttributeError, RecursionError):
                raise IgptError(f"{side}: palette sidecar is not valid JSON") from None
            if want is not None and want != pal.hash:
                raise IgptError(f"{path} does not match its sidecar {side.name} (content hash differs)")
        return pal


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()
