"""CIFAR python batches (igpt.cifar): CIFAR-10 and CIFAR-100 layouts read back exactly, the restricted
unpickler refuses code, malformed batches are one-line errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from conftest import collect, write_cifar_batch

from igpt import cifar
from igpt.errors import IgptError


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batch_round_trip(tmp_path, rng, protocol):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    xs = [rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    ys = [rng.integers(0, 10, 5) for _ in range(2)]
    write_cifar_batch(root / "data_batch_1", xs[0], ys[0], protocol=protocol)
    write_cifar_batch(root / "data_batch_2", xs[1], ys[1], protocol=protocol)
    xt = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(root / "test_batch", xt, [1, 2, 3], protocol=protocol)
    names = [f"class{i}".encode() for i in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=protocol))
    src = cifar.cifar_source(tmp_path)  # the folder holding cifar-10-batches-py/
    assert src.channels == 3 and src.class_names == [f"class{i}" for i in range(10)]
    imgs, labs = collect(src.splits["train"])
    assert np.array_equal(imgs, np.concatenate(xs)) and np.array_equal(labs, np.concatenate(ys))
    imgs, labs = collect(src.splits["test"])
    assert np.array_equal(imgs, xt) and list(labs) == [1, 2, 3]


def test_cifar100_layout(tmp_path, rng):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(root / "train", x, [0, 99, 5, 7], key="fine_labels")
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple"] * 100}))
    src = cifar.cifar_source(root)
    imgs, labs = collect(src.splits["train"])
    assert np.array_equal(imgs, x) and list(labs) == [0, 99, 5, 7] and "test" not in src.splits


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_cifar_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(IgptError, match="data_batch_1.*not allowed"):
        cifar.cifar_source(tmp_path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_cifar_malformed(tmp_path):
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(IgptError, match="uint8 array \\(N, 3072\\)"):
        collect(cifar.cifar_source(tmp_path / "b").splits["train"])
    (tmp_path / "c").write_bytes(b"not a pickle at all")
    with pytest.raises(IgptError, match="not a valid CIFAR"):
        cifar.read_cifar_batch(tmp_path / "c")
    for labels in (5, [1.7, 2.0], [0, -1], ["a", "b"], [1]):  # not a list, floats, negative, strings, too few
        (tmp_path / "d").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}))
        with pytest.raises(IgptError, match="'labels' must"):
            collect(cifar.cifar_source(tmp_path / "d").splits["train"])
