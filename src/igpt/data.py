"""Data sources: IDX files, image folders, .npz/.npy arrays (CIFAR python batches: ``igpt.cifar``).

Every source yields uint8 images (N, H, W, C) with C = 1 (grey) or 3 (RGB), integer labels where the source
has them, and class names where it knows them. Sources are read in chunks (``Split.chunks``), so memory does
not grow with the size of the data set.

The image decoding policy and resizing live in ``igpt.images``.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from igpt.errors import IgptError
from igpt.images import FORMATS, IMAGE_EXTS, composite_on_white, convert_channels, decode_image, is_grey
from igpt.io import NPY_ERRORS, check_npy_file

CHUNK_BYTES = 1 << 25  # decoded full-size images held at once by a folder reader (besides chunk_size)
_MAX_ELEMENTS = 1 << 34  # refuse headers that claim more than 16 GiB of pixels before allocating anything

Chunk = tuple[list[np.ndarray] | np.ndarray, np.ndarray | None]  # (images (b, H, W, C) uint8, labels (b,))


@dataclass
class Split:
    """One split of a source. ``read(chunk_size)`` yields (images, labels) chunks in a fixed order."""

    n: int  # images in the split (bad files that skip_bad drops are counted in ``skipped``)
    read: Callable[[int], Iterator[Chunk]]
    skipped: list[str] = field(default_factory=list)
    labelled: bool = True  # whether its chunks carry labels (known before reading any image)

    def chunks(self, chunk_size: int = 4096) -> Iterator[Chunk]:
        return self.read(chunk_size)


@dataclass
class Source:
    name: str  # what the user asked for, for meta.json and messages
    channels: int  # 1 or 3: every image of every split is converted to this
    splits: dict[str, Split]  # "train", optionally "val" and "test"
    class_names: list[str] | None = None


# -- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------------------
def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx_header(f, path: Path) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise IgptError(f"{path}: not an IDX file (bad magic number)")
    if head[2] != 0x08:
        raise IgptError(f"{path}: IDX element type 0x{head[2]:02x} is not supported (only 0x08, unsigned byte)")
    ndim = head[3]
    if not 1 <= ndim <= 4:
        raise IgptError(f"{path}: IDX file with {ndim} dimensions is not supported")
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise IgptError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
    if int(np.prod(dims, dtype=np.float64)) > _MAX_ELEMENTS:
        raise IgptError(f"{path}: IDX header claims shape {dims}, too large to be real")
    return dims


_IDX_ERRORS = (OSError, EOFError, gzip.BadGzipFile, zlib.error)


def _read_at_most(f, n: int) -> bytes:
    """Up to n bytes, in 1 MiB reads: memory follows the data actually there, not what a header claims."""
    parts, got = [], 0
    while got < n:
        b = f.read(min(n - got, 1 << 20))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_idx(path: str | Path) -> np.ndarray:
    """Read a whole IDX file (gzip or plain) into a uint8 array of its declared shape."""
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            dims = read_idx_header(f, path)
            data = _read_at_most(f, int(np.prod(dims)) + 1)
    except _IDX_ERRORS as e:
        raise IgptError(f"{path}: corrupt file ({e})") from None
    if len(data) != int(np.prod(dims)):
        raise IgptError(f"{path}: IDX payload is {len(data)} bytes, header {dims} says {int(np.prod(dims))}")
    return np.frombuffer(data, np.uint8).reshape(dims)


def idx_split(images: Path, labels: Path | None, start: int = 0, stop: int | None = None) -> Split:
    """A split reading images [start, stop) of an IDX image file (N, H, W) in chunks, with IDX labels."""
    try:
        with _open_maybe_gzip(images) as f:
            dims = read_idx_header(f, images)
    except _IDX_ERRORS as e:
        raise IgptError(f"{images}: corrupt file ({e})") from None
    if len(dims) != 3 or not (dims[1] and dims[2]):
        raise IgptError(f"{images}: expected an IDX image file (N, H, W) with H, W >= 1, got shape {dims}")
    lab = None
    if labels is not None:
        lab = read_idx(labels)
        if lab.shape != (dims[0],):
            what = f"{lab.shape[0]} labels" if lab.ndim == 1 else f"labels of shape {lab.shape}"  # (N, 1): not 'N labels'
            raise IgptError(f"{labels}: {what} for {dims[0]} images in {images.name}")
    stop = dims[0] if stop is None else min(stop, dims[0])
    hw = dims[1] * dims[2]

    def read(chunk: int) -> Iterator[Chunk]:
        with _open_maybe_gzip(images) as f:
            read_idx_header(f, images)
            try:
                f.seek(4 + 4 * len(dims) + start * hw)
                for s in range(start, stop, chunk):
                    b = min(chunk, stop - s)
                    buf = _read_at_most(f, b * hw)
                    if len(buf) != b * hw:
                        raise IgptError(f"{images}: truncated IDX file (image {s + len(buf) // hw} of {dims[0]} missing)")
                    x = np.frombuffer(buf, np.uint8).reshape(b, dims[1], dims[2], 1)
                    yield x, None if lab is None else lab[s : s + b].astype(np.int64)
            except _IDX_ERRORS as e:
                raise IgptError(f"{images}: corrupt file ({e})") from None

    return Split(stop - start, read, labelled=lab is not None)


# -- image folders ------------------------------------------------------------------------------------------
def _image_files(d: Path) -> list[Path]:
    """The image files of a folder; hidden ones ('.name', e.g. macOS's '._name.png' resource forks, which are
    not images) are left out, as hidden folders are."""
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


def _file_channels(path: Path) -> int:
    """Channels the decoding policy gives this file, from its header only (no pixel decoding)."""
    try:
        with Image.open(path, formats=FORMATS) as im:
            return 1 if is_grey(im) else 3
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1  # a bad file does not decide the channel count; decoding it reports the problem


def _files_split(files: list[Path], labels: list[int] | None, channels: int, skip_bad: bool) -> Split:
    split = Split(len(files), lambda chunk: iter(()), labelled=labels is not None)

    def read(chunk: int) -> Iterator[Chunk]:
        split.skipped.clear()
        imgs, labs, held = [], [], 0
        for i in range(len(files)):
            try:
                imgs.append(convert_channels(decode_image(files[i]), channels))
            except IgptError:
                if not skip_bad:
                    raise
                split.skipped.append(str(files[i]))
            else:
                labs.append(-1 if labels is None else labels[i])
                held += imgs[-1].nbytes
            if len(imgs) == chunk or held >= CHUNK_BYTES or i == len(files) - 1:  # full-size images: bound bytes too
                yield imgs, None if labels is None else np.asarray(labs, dtype=np.int64)
                imgs, labs, held = [], [], 0

    split.read = read
    return split


def _refuse_loose_images(d: Path, beside: str) -> None:
    """IgptError if ``d`` holds image files of its own beside ``beside`` (they were left out without a word)."""
    loose = _image_files(d)
    if loose:
        raise IgptError(f"{d}: {len(loose)} image file(s) (e.g. {loose[0].name}) beside {beside} would be left "
                        "out; move them into a class folder or out of the data folder")


def folder_source(root: str | Path, channels: int | None = None, skip_bad: bool = False) -> Source:
    """``root/<class>/*.png`` (labels from sorted folder names), ``root/{train,val,test}/<class>/...``, or a
    flat ``root/*.png`` (no labels). ``channels`` None means RGB if any file is colour, else grey."""
    root = Path(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    layout: dict[str, Path] = {"train": root}
    if subdirs and {p.name for p in subdirs} <= {"train", "val", "test"} and (root / "train").is_dir():
        layout = {p.name: p for p in subdirs}
        _refuse_loose_images(root, "the split folders")
    per_split: dict[str, tuple[list[Path], list[int] | None]] = {}
    class_names: list[str] | None = None
    for split, d in layout.items():
        folders = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = [p.name for p in folders if _image_files(p)]
        for p in folders:  # images a level deeper than read: the class (and its images) had vanished silently
            if p.name not in classes and any(_image_files(q) for q in p.rglob("*") if q.is_dir()):
                raise IgptError(f"{p}: its images are in subfolders; a class folder must hold its image files "
                                "directly (root/<class>/*.png)")
        if classes:
            _refuse_loose_images(d, "class folders")
            if class_names is None:
                class_names = classes
            elif classes != class_names:
                raise IgptError(f"{d}: class folders {classes} differ from the train split's {class_names}")
            files, labels = [], []
            for i, c in enumerate(class_names):
                got = _image_files(d / c)
                files += got
                labels += [i] * len(got)
            per_split[split] = (files, labels)
        else:
            per_split[split] = (_image_files(d), None)
        if not per_split[split][0]:
            raise IgptError(f"{d}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
    unlabelled = [s for s, (_, ls) in per_split.items() if ls is None]
    if class_names is not None and unlabelled:  # meta.json had said "labels": false beside train_labels.npy
        raise IgptError(f"{root}: the {', '.join(unlabelled)} split(s) hold images without class folders while "
                        f"the others have classes {class_names}; give every split the same class folders")
    if channels is None:
        channels = 3 if any(_file_channels(f) == 3 for fs, _ in per_split.values() for f in fs) else 1
    splits = {s: _files_split(fs, ls, channels, skip_bad) for s, (fs, ls) in per_split.items()}
    return Source(str(root), channels, splits, class_names)


# -- numpy arrays -------------------------------------------------------------------------------------------
def check_array(x: np.ndarray, where: str) -> np.ndarray:
    """Images as (N, H, W) or (N, H, W, 1|3|4), uint8 or uint16, H and W >= 1 -> the same data as a 4-D view
    (nothing is read or copied: a memory map stays one)."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise IgptError(f"{where}: images must have shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {x.shape}")
    if x.dtype not in (np.uint8, np.uint16):
        raise IgptError(f"{where}: images must be uint8 (or uint16), got {x.dtype}")
    if not (x.shape[1] and x.shape[2]):
        raise IgptError(f"{where}: images of {x.shape[1]}x{x.shape[2]} pixels (height and width must be >= 1)")
    return x


def normalise_array(x: np.ndarray, where: str) -> np.ndarray:
    """Images as ``check_array`` takes them -> uint8 (N, H, W, 1|3): 16 bits scaled to 8, alpha composited on
    white (a copy when converted: apply it to chunks of a large array)."""
    x = check_array(x, where)
    if x.dtype == np.uint16:
        x = ((x.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if x.shape[-1] == 4:
        x = composite_on_white(x)
    return x


def check_labels(y, n: int, where: str) -> np.ndarray:
    """Integer labels (n,), each in 0 .. int64 max (what token shards store) -> int64; IgptError otherwise."""
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise IgptError(f"{where}: labels must be integers of shape ({n},), got {y.dtype} {y.shape}")
    if n and (int(y.min()) < 0 or int(y.max()) > np.iinfo(np.int64).max):
        raise IgptError(f"{where}: labels must be in 0 .. 2**63 - 1, got {int(y.min())} .. {int(y.max())}")
    return y.astype(np.int64)


def _array_split(x: np.ndarray, y: np.ndarray | None, channels: int, where: str) -> Split:
    x = check_array(x, where)  # converted chunk by chunk in read(): memory stays bounded for any dtype / alpha
    if y is not None:
        y = check_labels(y, len(x), where)

    def read(chunk: int) -> Iterator[Chunk]:
        for s in range(0, len(x), chunk):
            imgs = normalise_array(np.asarray(x[s : s + chunk]), where)
            if imgs.shape[-1] != channels:
                imgs = np.stack([convert_channels(im, channels) for im in imgs])
            yield imgs, None if y is None else y[s : s + chunk]

    return Split(len(x), read, labelled=y is not None)


_NPZ_LAYOUTS = [  # (split, images key, labels key)
    [("train", "images", "labels")],
    [("train", "x", "y")],
    [("train", "x_train", "y_train"), ("test", "x_test", "y_test")],
    [("train", "train_images", "train_labels"), ("test", "test_images", "test_labels")],
]


def array_source(path: str | Path, channels: int | None = None) -> Source:
    """A ``.npy`` of images, or an ``.npz`` with images and optional labels (``allow_pickle=False``):
    keys images/labels, x/y, x_train/y_train/x_test/y_test or train_images/.../test_labels, and an optional
    ``class_names`` string array."""
    path = Path(path)
    try:
        check_npy_file(path)  # object arrays and headers that claim more data than the file holds
        if path.suffix == ".npy":
            arrays = {"images": np.load(path, mmap_mode="r", allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
    except IgptError:
        raise
    except NPY_ERRORS as e:
        raise IgptError(f"{path}: not a readable numpy file without pickled objects ({e})") from None
    for layout in _NPZ_LAYOUTS:
        if layout[0][1] in arrays:
            break
    else:
        raise IgptError(f"{path}: no image array; expected one of the keys images, x, x_train, train_images "
                        f"(found {sorted(arrays)})")
    ch = channels
    if ch is None:
        ch = 3 if normalise_array(arrays[layout[0][1]][:1], str(path)).shape[-1] == 3 else 1
    splits = {s: _array_split(arrays[xk], arrays.get(yk), ch, f"{path}[{xk}]") for s, xk, yk in layout if xk in arrays}
    names = arrays.get("class_names")
    if names is not None:
        try:  # a bytes array (np.bytes_, as h5py and Python 2 saved them) gave "b'cat'"
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(names)]
        except UnicodeDecodeError as e:
            raise IgptError(f"{path}: a class name in class_names is not UTF-8 ({e})") from None
        top = max((int(y.max()) for _, _, yk in layout if yk in arrays and len(y := arrays[yk])), default=-1)
        if top >= len(names):
            raise IgptError(f"{path}: {len(names)} class_names for labels up to {top}")
    return Source(str(path), ch, splits, names)
