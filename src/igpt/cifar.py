"""CIFAR-10/100 python batches as a data source, read with a restricted unpickler that accepts only what the
batches hold (dicts, lists, bytes, ints, plain numpy arrays), so a planted pickle cannot run code."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from igpt.data import Chunk, Source, Split
from igpt.errors import IgptError


class _CifarUnpickler(pickle._Unpickler):  # noqa: S301 - restricted by find_class below
    """Accepts only what CIFAR batches contain: dicts, lists, bytes/str, ints and plain numpy arrays.

    The pure-Python unpickler, not the C one: the C one sizes its memo table by the largest index a file
    names, so a damaged batch with a LONG_BINPUT of 2^32 makes it allocate and zero tens of GB (found by
    bench/fuzz.py); the Python one keeps the memo in a dict."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles from Python 3 spell bytes as _codecs.encode(str, 'latin1')
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """The one use of _codecs.encode in CIFAR pickles; no other codec (some import modules) is looked up."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed in a CIFAR batch")
    return text.encode("latin1")


def read_cifar_batch(path: str | Path) -> dict:
    """Load one CIFAR python batch (or meta file) with the restricted unpickler; keys become str."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, UnicodeError, ModuleNotFoundError, LookupError, RecursionError,
            struct.error) as e:
        raise IgptError(f"{path}: not a valid CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise IgptError(f"{path}: not a valid CIFAR python batch (holds a {type(d).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def cifar_images(d: dict, path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """A loaded batch -> images uint8 (N, 32, 32, 3) and labels int64 (N,)."""
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise IgptError(f"{path}: 'data' must be a uint8 array (N, 3072)")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise IgptError(f"{path}: '{label_key}' must be a list of one label per image ({len(data)})")
    try:
        arr = np.asarray(labels)
    except (TypeError, ValueError):
        arr = np.asarray([], dtype=object)
    if (arr.shape != (len(data),) or (arr.dtype.kind not in "iu" and len(arr))
            or (len(arr) and (arr.min() < 0 or int(arr.max()) > np.iinfo(np.int64).max))):
        raise IgptError(f"{path}: '{label_key}' must hold integer labels in 0 .. 2**63 - 1")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), arr.astype(np.int64)


def _batches_split(files: list[Path], label_key: str) -> Split:
    n = 0
    for p in files:  # count without keeping: a batch is ~30 MB
        n += len(cifar_images(read_cifar_batch(p), p, label_key)[1])

    def read(chunk: int) -> Iterator[Chunk]:
        for p in files:
            x, y = cifar_images(read_cifar_batch(p), p, label_key)
            for s in range(0, len(x), chunk):
                yield x[s : s + chunk], y[s : s + chunk]

    return Split(n, read)


def cifar_source(root: str | Path, name: str | None = None) -> Source:
    """``cifar-10-batches-py/`` or ``cifar-100-python/`` (or a folder holding one), or one batch file."""
    root = Path(root)
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (root / sub).is_dir():
            root = root / sub
    if root.is_file():
        d = read_cifar_batch(root)
        key = "labels" if "labels" in d else "fine_labels"
        return Source(name or str(root), 3, {"train": _batches_split([root], key)})
    if (root / "data_batch_1").is_file():
        train = sorted((p for p in root.glob("data_batch_[0-9]*") if p.name[11:].isdigit()),
                       key=lambda p: int(p.name[11:]))
        splits = {"train": _batches_split(train, "labels")}
        if (root / "test_batch").is_file():
            splits["test"] = _batches_split([root / "test_batch"], "labels")
        meta, names_key = root / "batches.meta", "label_names"
    elif (root / "train").is_file():
        splits = {"train": _batches_split([root / "train"], "fine_labels")}
        if (root / "test").is_file():
            splits["test"] = _batches_split([root / "test"], "fine_labels")
        meta, names_key = root / "meta", "fine_label_names"
    else:
        raise IgptError(f"{root}: no CIFAR batches (data_batch_1 ... / test_batch, or train / test)")
    names = None
    if meta.is_file():
        raw = read_cifar_batch(meta).get(names_key)
        if raw is not None and not isinstance(raw, list | tuple | np.ndarray):
            raise IgptError(f"{meta}: '{names_key}' must be a list of class names, got {type(raw).__name__}")
        try:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw] if raw is not None else None
        except UnicodeDecodeError as e:
            raise IgptError(f"{meta}: a class name in '{names_key}' is not UTF-8 ({e})") from None
    return Source(name or str(root), 3, splits, names)
