"""Writing token shards: images -> n_px x n_px -> palette ids, once; every later stage memory-maps them
(``igpt.shards.load_shards``).

``prepare`` makes, in one atomic directory, ``{train,val,test}_tokens.npy`` (uint16 (N, n_px * n_px), raster
order), the matching ``*_labels.npy`` (int64) when the source has labels, ``*_pixels.npy`` (uint8
(N, n_px, n_px, C): the resized images before quantization, for the probe's raw-pixel baseline; ``--no-pixels``
leaves them out), ``*_native.npy`` (the same at the source's own resolution, see ``Native``), ``palette.npy``
(+ ``palette.json``) and ``meta.json``. Images are decoded and resized once, in chunks, into a pixel file on
disk; the palette is fitted on pixels sampled from the training rows (never validation or test); a second pass
quantizes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from igpt import __version__
from igpt.data import Source
from igpt.datasets import BUNDLED, open_source
from igpt.errors import IgptError
from igpt.images import convert_channels, resize_batch
from igpt.io import atomic_dir, atomic_write_bytes, check_replaceable
from igpt.kmeans import fit_palette
from igpt.palette import Palette
from igpt.settings import check_seed
from igpt.shards import FORMAT, FORMAT_VERSION, SPLITS

MAX_PALETTE = 65534  # the largest palette igpt.palette.Palette takes (ids stay below its 0xFFFF marker)
NATIVE_MAX_VALUES = 64 * 64 * 3  # native-resolution pixel files are kept up to this many values per image
OPENAI_NPY = "openai-npy:"  # --data openai-npy:DIR: OpenAI's pre-quantized trX/vaX/teX arrays (igpt.openai)


@dataclass
class PrepareConfig:
    out: str  # output directory, replaced atomically
    data: str = BUNDLED  # named data set, image folder, CIFAR folder/batch, IDX file, .npz/.npy
    n_px: int = 32  # side of the square images the model sees; the paper uses 32, 48 and 64
    palette: str = "fit"  # "fit" (k-means on the training pixels) or a palette file to reuse
    palette_size: int | None = None  # k for "fit"; None: 512 for RGB (the paper's 9-bit palette), 16 for grey
    data_dir: str | None = None  # folder holding named data sets as DIR/<name>/ (else $IGPT_DATA_DIR, ...)
    channels: int | None = None  # force 1 (grey) or 3 (RGB); None keeps the source's own
    val_fraction: float = 0.1  # of train held out for validation, as the paper does for CIFAR and STL-10
    test_fraction: float = 0.0  # of train held out as a test split when the source has none (0: no test split)
    seed: int = 0  # the validation split and the palette fit
    skip_bad: bool = False  # skip undecodable image files (counted in meta.json) instead of stopping
    chunk_size: int = 2048  # images per chunk: bounds peak memory
    fit_pixels: int = 1_000_000  # pixels sampled from the training rows for the k-means fit
    fit_device: str | None = None  # torch device for the fit; None picks CUDA when present
    pixels: bool = True  # also write {split}_pixels.npy: the resized images before quantization (probe baseline)

    def __post_init__(self):
        check_seed(self.seed, "prepare")
        if not 2 <= self.n_px <= 1024:
            raise IgptError(f"n_px must be between 2 and 1024, got {self.n_px}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise IgptError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise IgptError(f"test_fraction must be in [0, 1) and leave training rows beside val_fraction, got "
                            f"test {self.test_fraction} + val {self.val_fraction}")
        if self.palette != "fit" and self.palette_size is not None:
            raise IgptError("--palette-size only applies to --palette fit; a palette file has its own size")
        if self.palette_size is not None and not 2 <= self.palette_size <= MAX_PALETTE:
            raise IgptError(f"palette_size must be between 2 and {MAX_PALETTE} (uint16 ids), got {self.palette_size}")
        if self.channels not in (None, 1, 3):
            raise IgptError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if self.chunk_size < 1 or self.fit_pixels < 1:
            raise IgptError("chunk_size and fit_pixels must be positive")


def val_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of n training rows are held out for validation: round(n * fraction) of them, chosen by seed."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: round(n * fraction)]] = True
    return mask


def planned_counts(src: Source, cfg: PrepareConfig) -> dict[str, int]:
    """The split sizes ``prepare`` will write for ``src``, known before decoding (files that --skip-bad will
    drop are not foreseen), by its rules: a test split carved from train when the source has none and
    test_fraction > 0, then a val split from the rest when the source has none."""
    n = src.splits["train"].n
    test = src.splits["test"].n if "test" in src.splits else round(n * cfg.test_fraction)
    rest = n - (0 if "test" in src.splits else test)
    val = src.splits["val"].n if "val" in src.splits else round(rest * cfg.val_fraction)
    counts = {"train": rest - (0 if "val" in src.splits else val), "val": val}
    if "test" in src.splits or cfg.test_fraction:
        counts["test"] = test
    return counts


class PixelFile:
    """Decoded images (N, n_px, n_px, C) uint8 in a raw file, written and read in sequential chunks.

    Plain file I/O rather than a memory map, so pages read or written do not stay in the process's memory.
    """

    def __init__(self, path: Path, n_px: int, channels: int):
        self.path, self.shape_1 = path, (n_px, n_px, channels)
        self.row_bytes = n_px * n_px * channels
        self.rows = 0

    def append(self, x: np.ndarray) -> None:
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(x, dtype=np.uint8).tobytes())
        self.rows += len(x)

    def chunks(self, chunk: int):
        """Yield (first row, pixels (b, n_px, n_px, C)) in order."""
        with open(self.path, "rb") as f:
            for s in range(0, self.rows, chunk):
                b = min(chunk, self.rows - s)
                yield s, np.frombuffer(f.read(b * self.row_bytes), np.uint8).reshape(b, *self.shape_1)


def sample_pixels(pixels: PixelFile, rows: np.ndarray, count: int, seed: int, chunk: int) -> np.ndarray:
    """Up to ``count`` distinct pixels (P, C) drawn uniformly from the given rows of a pixel file."""
    per_row = pixels.shape_1[0] * pixels.shape_1[1]
    total = len(rows) * per_row
    flat = np.random.default_rng(seed).choice(total, size=count, replace=False) if total > count else np.arange(total)
    flat.sort()
    r, p = rows[flat // per_row], flat % per_row  # r is sorted because rows and flat are
    out = []
    for s, x in pixels.chunks(chunk):
        lo, hi = np.searchsorted(r, [s, s + len(x)])
        out.append(x.reshape(len(x), per_row, -1)[r[lo:hi] - s, p[lo:hi]])
    return np.concatenate(out)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not sys.stderr.isatty(), leave=False)


class Native:
    """Pass-1 bookkeeping of the images at their native resolution (centre-cropped square, not resized), kept
    for the probe's second raw-pixel baseline when every image of every split has the same shorter side,
    larger than n_px and at most NATIVE_MAX_VALUES values per image; otherwise dropped (``side`` 0)."""

    def __init__(self, cfg: PrepareConfig, channels: int, tmp: Path):
        self.side: int | None = None if cfg.pixels else 0  # None: not seen an image yet
        self.n_px, self.channels, self.tmp = cfg.n_px, channels, tmp
        self.files: dict[str, PixelFile] = {}

    def add(self, split: str, images, x_channels) -> None:
        if self.side == 0 or not len(images):
            return
        sides = {min(im.shape[:2]) for im in images}
        if self.side is None:
            self.side = min(sides)
        if sides != {self.side} or self.side <= self.n_px or self.side**2 * self.channels > NATIVE_MAX_VALUES:
            self.drop()
            return
        if split not in self.files:
            self.files[split] = PixelFile(self.tmp / f".native-{split}.u8", self.side, self.channels)
        self.files[split].append(x_channels(resize_batch(images, self.side)))  # a centre crop, no resampling

    def drop(self) -> None:
        self.side = 0
        for f in self.files.values():
            f.path.unlink(missing_ok=True)
        self.files = {}


def _decode_split(src: Source, split: str, cfg: PrepareConfig, tmp: Path,
                  native: Native) -> tuple[PixelFile, np.ndarray | None]:
    """Pass 1: decode and resize a split, in chunks, into a pixel file (and ``native``); return it and the labels."""
    s = src.splits[split]
    pix = PixelFile(tmp / f".pixels-{split}.u8", cfg.n_px, src.channels)
    labels: list[np.ndarray] = []

    def with_channels(x: np.ndarray) -> np.ndarray:
        if len(x) and x.shape[-1] != src.channels:
            return np.stack([convert_channels(im, src.channels) for im in x])
        return x

    with _bar(s.n, f"decode {split}") as bar:
        for images, lab in s.chunks(cfg.chunk_size):
            x = with_channels(resize_batch(images, cfg.n_px))
            pix.append(x)
            native.add(split, images, with_channels)
            if lab is not None:
                labels.append(lab)
            bar.update(len(x))
    if pix.rows == 0:
        raise IgptError(f"{src.name}: the {split} split has no usable images")
    return pix, np.concatenate(labels) if labels else None


class TokenWriter:
    """Appends rows to a .npy file whose final shape (n, *row) is known up front: uint16 ids by default."""

    def __init__(self, path: Path, n: int, t: int | tuple[int, ...], dtype: str = "<u2"):
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        row = (t,) if isinstance(t, int) else tuple(t)
        np.lib.format.write_array_header_2_0(self.f, {"descr": dtype, "fortran_order": False, "shape": (n, *row)})
        self.left, self.dtype = n, dtype

    def write(self, rows: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(rows.astype(self.dtype, copy=False)).tobytes())
        self.left -= len(rows)

    def close(self) -> None:
        self.f.close()
        assert self.left == 0, "row count does not match the header"


def fit_device(name: str | None) -> str:
    """The palette fit's device: ``name`` checked, None -> 'cuda' when present, else 'cpu'."""
    from igpt.distributed import get_dist_info, pick_device  # torch: only for a fit

    device = pick_device(name, get_dist_info(), flag="prepare config fit_device")  # checked even when named
    return name or device.type


def fit_k(cfg: PrepareConfig, channels: int) -> int:
    """The palette size of a fit: --palette-size, else 512 for RGB (the paper's 9-bit palette), 16 for grey."""
    return cfg.palette_size or (512 if channels == 3 else 16)


def check_fit_size(k: int, channels: int, fit_pixels: int) -> None:
    """IgptError for a palette size no fit can give: over 256 for grey data, or over the pixels sampled."""
    if channels == 1 and k > 256:
        raise IgptError(f"--palette-size {k}: grey data has at most 256 distinct levels")
    if k > fit_pixels:
        raise IgptError(f"--fit-pixels {fit_pixels} samples fewer pixels than the palette's {k} colours")


def prepare(cfg: PrepareConfig) -> dict:
    """Build token shards as described in the module docstring; returns the meta.json content."""
    try:
        return _prepare(cfg)
    except OSError as e:  # a full disk while writing the temporary files names none: name the output
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, cfg.out) from None
        raise


def _prepare(cfg: PrepareConfig) -> dict:
    check_replaceable(Path(cfg.out), {"meta.json": "palette_sha256"})  # before any work: never replace a folder we did not write
    if cfg.data.startswith(OPENAI_NPY):  # OpenAI's arrays are palette ids already: no decoding or quantizing
        from igpt.openai import prepare_openai_npy

        return prepare_openai_npy(cfg)
    src = open_source(cfg.data, cfg.data_dir, cfg.channels, cfg.skip_bad)
    pal_file = None
    if cfg.palette != "fit":  # check the palette before decoding anything
        pal_file = Palette.load(cfg.palette)
        pal_file.check_channels(src.channels, f"the data ({src.name})")
    else:  # the fit's device checked (an absent CUDA was an AssertionError after decoding), and recorded
        cfg = replace(cfg, fit_device=fit_device(cfg.fit_device))  # resolved: `--config meta.json` fits there too
        check_fit_size(fit_k(cfg, src.channels), src.channels, cfg.fit_pixels)  # before decoding and a long fit
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        native = Native(cfg, src.channels, tmp)
        decoded = {split: _decode_split(src, split, cfg, tmp, native) for split in src.splits}
        # output split -> (decoded split it comes from, mask over that split's rows)
        routes: dict[str, tuple[str, np.ndarray]] = {}
        n_train = decoded["train"][0].rows
        held_test = np.zeros(n_train, dtype=bool)
        if "test" not in decoded and cfg.test_fraction:  # carve a test split out of train first
            held_test = val_mask(n_train, cfg.test_fraction, cfg.seed + 1)
            if not held_test.any():  # the test split asked for would be empty (exit status 0 until now)
                raise IgptError(f"--test-fraction {cfg.test_fraction:g} of {n_train} training images holds out "
                                f"none (round({n_train} x {cfg.test_fraction:g}) = 0): give a larger fraction")
            routes["test"] = ("train", held_test)
        if "val" in decoded:
            routes["train"] = ("train", ~held_test)
            routes["val"] = ("val", np.ones(decoded["val"][0].rows, dtype=bool))
        else:
            is_val = np.zeros(n_train, dtype=bool)
            is_val[np.flatnonzero(~held_test)] = val_mask(int((~held_test).sum()), cfg.val_fraction, cfg.seed)
            routes["train"], routes["val"] = ("train", ~is_val & ~held_test), ("train", is_val)
        if "test" in decoded:
            routes["test"] = ("test", np.ones(decoded["test"][0].rows, dtype=bool))
        routes = {k: routes[k] for k in SPLITS if k in routes}
        if not routes["train"][1].any():
            raise IgptError(f"{src.name}: no training images left after holding out val (--val-fraction "
                            f"{cfg.val_fraction}) and test (--test-fraction {cfg.test_fraction}) from "
                            f"{n_train} image(s)")
        fit_info = None
        if pal_file is None:
            k = fit_k(cfg, src.channels)
            train_rows = np.flatnonzero(routes["train"][1])
            px = sample_pixels(decoded["train"][0], train_rows, cfg.fit_pixels, cfg.seed, cfg.chunk_size)
            fit = fit_palette(px, k, seed=cfg.seed, device=cfg.fit_device)
            palette = fit.palette
            fit_info = {"k": k, "pixels": len(px), "distinct_colours": fit.n_unique, "inertia": fit.inertia,
                        "iterations": fit.n_iter, "device": cfg.fit_device}
        else:
            palette = pal_file
        palette.save(tmp / "palette.npy")
        t = cfg.n_px * cfg.n_px
        counts = {split: int(mask.sum()) for split, (_, mask) in routes.items()}
        with _bar(sum(p.rows for p, _ in decoded.values()), "quantize") as bar:
            for dsplit, (pixels, labels) in decoded.items():  # pass 2: one sequential read per decoded split
                outs = {o: TokenWriter(tmp / f"{o}_tokens.npy", counts[o], t) for o, (d, _) in routes.items()
                        if d == dsplit}
                raw = {o: TokenWriter(tmp / f"{o}_pixels.npy", counts[o], pixels.shape_1, "|u1")
                       for o in outs} if cfg.pixels else {}
                nat_file = native.files.get(dsplit)
                nat = {o: TokenWriter(tmp / f"{o}_native.npy", counts[o], nat_file.shape_1, "|u1")
                       for o in outs} if nat_file else {}
                nat_chunks = nat_file.chunks(cfg.chunk_size) if nat_file else None
                for s, x in pixels.chunks(cfg.chunk_size):
                    ids = palette.quantize(x).reshape(len(x), t)
                    rows = {o: routes[o][1][s : s + len(x)] for o in outs}
                    for o, w in outs.items():
                        w.write(ids[rows[o]])
                    for o, w in raw.items():
                        w.write(x[rows[o]])
                    if nat_chunks is not None:
                        xn = next(nat_chunks)[1]
                        for o, w in nat.items():
                            w.write(xn[rows[o]])
                    bar.update(len(x))
                for w in [*outs.values(), *raw.values(), *nat.values()]:
                    w.close()
                if labels is not None:
                    for o in outs:
                        np.save(tmp / f"{o}_labels.npy", labels[routes[o][1]], allow_pickle=False)
                pixels.path.unlink()
                if nat_file:
                    nat_file.path.unlink()
        meta = write_meta(tmp, cfg, palette, src.name, src.channels, counts,
                          all(decoded[d][1] is not None for d, _ in routes.values()), src.class_names,
                          sorted(f for s in src.splits.values() for f in s.skipped), fit_info,
                          native.side or None)
    return meta


def write_meta(folder: Path, cfg: PrepareConfig, palette: Palette, source: str, channels: int,
               counts: dict[str, int], labels: bool, class_names: list[str] | None = None,
               skipped: list[str] | None = None, fit_info: dict | None = None, native_px: int | None = None) -> dict:
    """Write meta.json into ``folder`` (last, once the token files are complete) and return it."""
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "created_by": f"igpt {__version__}",
        "n_px": cfg.n_px, "channels": channels, "palette_size": palette.k, "palette_sha256": palette.hash,
        "source": source, "counts": counts, "labels": labels,
        "class_names": class_names, "split_seed": cfg.seed, "val_fraction": cfg.val_fraction,
        "skipped": skipped or [], "palette_fit": fit_info, "native_px": native_px, "config": asdict(cfg),
    }
    atomic_write_bytes(folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta
