"""Shared fixtures: real data in ../shared/data (skipped when absent) and writers for small test files."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "README.md").is_file():
        pytest.skip(f"real data not present at {SHARED}")
    return SHARED


def write_idx(path: Path, arr: np.ndarray, compress: bool | None = None) -> Path:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz)."""
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_cifar_batch(path: Path, images: np.ndarray, labels, key: str = "labels", protocol: int = 2) -> Path:
    """Write images (N, 32, 32, 3) as a CIFAR python batch, as the original files lay them out."""
    d = {b"batch_label": b"test batch", key.encode(): list(map(int, labels)),
         b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1).copy(),
         b"filenames": [f"img{i}.png".encode() for i in range(len(images))]}
    path.write_bytes(pickle.dumps(d, protocol=protocol))
    return path


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Token shards of the bundled data at 8x8 with 8 grey levels, shared by the training tests."""
    from igpt.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("sh") / "sh8"
    prepare(PrepareConfig(out=str(out), data="fashion-mnist-mini", n_px=8, palette_size=8))
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip, saying so, on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def collect(split, chunk=3):
    """All (images, labels) of a source split, read in chunks of `chunk`."""
    imgs, labs = [], []
    for x, y in split.chunks(chunk):
        imgs += list(x)
        if y is not None:
            labs += list(y)
    return np.stack(imgs), (np.array(labs) if labs else None)
