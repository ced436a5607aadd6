"""Named data sets: the bundled one, --data-dir / IGPT_DATA_DIR, Debian's copy, and downloads from a local server."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cifar_batch, write_idx

from igpt import datasets
from igpt.datasets import IDX_FILES, Named, open_source
from igpt.errors import IgptError


def count(split):
    return sum(len(x) for x, _ in split.chunks(4096))


def test_bundled_fashion_mnist():
    src = open_source("fashion-mnist-mini")
    assert src.channels == 1 and src.class_names[9] == "Ankle boot"
    assert src.splits["train"].n == 8000 and src.splits["test"].n == 2000
    x, y = next(src.splits["test"].chunks(10))
    assert x.shape == (10, 28, 28, 1) and x.dtype == np.uint8 and y.min() >= 0 and y.max() <= 9
    assert count(src.splits["train"]) == 8000


def make_idx_dir(d: Path, rng, n_train=6, n_test=4, gz=True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for role, fname in IDX_FILES.items():
        n = n_train if role.startswith("train") else n_test
        arr = rng.integers(0, 256, (n, 4, 4), dtype=np.uint8) if "images" in role else rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(d / (fname if gz else fname.removesuffix(".gz")), arr, compress=gz)
    return d


def test_data_dir_then_env(tmp_path, rng, monkeypatch):
    make_idx_dir(tmp_path / "a" / "mnist", rng, n_train=6)
    make_idx_dir(tmp_path / "b" / "mnist", rng, n_train=9, gz=False)
    monkeypatch.setenv("IGPT_DATA_DIR", str(tmp_path / "b"))
    assert open_source("mnist", data_dir=tmp_path / "a").splits["train"].n == 6  # the flag wins
    assert open_source("mnist").splits["train"].n == 9  # then the variable (plain, un-gzipped files)
    with pytest.raises(IgptError, match="'fashion-mnist' not found"):
        open_source("fashion-mnist")  # an explicit folder without the set is an error, not a download


def test_debian_copy_used(tmp_path, rng, monkeypatch):
    monkeypatch.delenv("IGPT_DATA_DIR", raising=False)
    make_idx_dir(tmp_path / "deb" / "fashion-mnist", rng, n_train=5)
    monkeypatch.setattr(datasets, "DEBIAN_ROOT", tmp_path / "deb")
    monkeypatch.setenv("IGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert open_source("fashion-mnist").splits["train"].n == 5
    assert not (tmp_path / "cache").exists()


class _Server:
    """A static file server on 127.0.0.1 for one folder, in a thread."""

    def __init__(self, root: Path):
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    s = _Server(tmp_path / "www")
    (tmp_path / "www").mkdir()
    yield s
    s.close()


def md5(p: Path) -> str:
    return "md5:" + hashlib.md5(p.read_bytes()).hexdigest()  # noqa: S324


def test_download_idx_from_local_server(tmp_path, rng, monkeypatch, server):
    www = make_idx_dir(tmp_path / "www" / "mnist", rng, n_train=7)
    spec = Named("idx", (server.url + "mnist/",), {f: md5(www / f) for f in IDX_FILES.values()})
    monkeypatch.setitem(datasets.NAMED, "mnist", spec)
    monkeypatch.setattr(datasets, "DEBIAN_ROOT", tmp_path / "nodeb")
    monkeypatch.delenv("IGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("IGPT_CACHE_DIR", str(tmp_path / "cache"))
    src = open_source("mnist")
    assert src.splits["train"].n == 7
    cached = tmp_path / "cache" / "datasets" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(IDX_FILES.values())  # no .part files left
    (www / "train-images-idx3-ubyte.gz").unlink()  # a second open uses the cache, not the server
    assert open_source("mnist").splits["train"].n == 7


def test_download_checksum_mismatch_leaves_nothing(tmp_path, rng, monkeypatch, server):
    (tmp_path / "www" / "f.bin").write_bytes(b"tampered")
    with pytest.raises(IgptError, match="checksum mismatch.*f.bin"):
        datasets.download(server.url + "f.bin", tmp_path / "dl" / "f.bin", "sha256:" + "0" * 64)
    assert list((tmp_path / "dl").iterdir()) == []
    good = "sha256:" + hashlib.sha256(b"tampered").hexdigest()
    assert datasets.download(server.url + "f.bin", tmp_path / "dl" / "f.bin", good).read_bytes() == b"tampered"


def test_download_unreachable_is_clear(tmp_path, monkeypatch, server):
    spec = Named("idx", (server.url + "missing/",), {f: "md5:" + "0" * 32 for f in IDX_FILES.values()})
    monkeypatch.setitem(datasets.NAMED, "mnist", spec)
    monkeypatch.setattr(datasets, "DEBIAN_ROOT", tmp_path / "nodeb")
    monkeypatch.delenv("IGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("IGPT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(IgptError, match="could not download mnist.*404"):
        open_source("mnist")


def test_download_cifar_archive_via_mirror(tmp_path, rng, monkeypatch, server):
    build = tmp_path / "build" / "cifar-10-batches-py"
    build.mkdir(parents=True)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(build / "data_batch_1", x, [0, 1, 2])
    write_cifar_batch(build / "test_batch", x[:1], [2])
    (build / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c"]}, protocol=2))
    (tmp_path / "www" / "cifar10").mkdir()
    archive = tmp_path / "www" / "cifar10" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(build, arcname="cifar-10-batches-py")
    monkeypatch.setitem(datasets.NAMED, "cifar10", Named("cifar", ("http://unused.invalid/",),
                                                         {"cifar-10-python.tar.gz": md5(archive)}))
    monkeypatch.setenv("IGPT_DATASET_MIRROR", server.url)  # the mirror replaces the canonical base URL
    monkeypatch.setattr(datasets, "DEBIAN_ROOT", tmp_path / "nodeb")
    monkeypatch.delenv("IGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("IGPT_CACHE_DIR", str(tmp_path / "cache"))
    src = open_source("cifar10")
    assert src.class_names == ["a", "b", "c"] and src.splits["train"].n == 3 and src.splits["test"].n == 1
    # a run killed while unpacking left part of the folder and no marker: the next one unpacks it again
    cache = tmp_path / "cache" / "datasets" / "cifar10"
    (cache / "cifar-10-batches-py" / "test_batch").unlink()
    (cache / "cifar-10-python.tar.gz.unpacked").unlink()
    src = open_source("cifar10")
    assert src.splits["test"].n == 1 and (cache / "cifar-10-python.tar.gz.unpacked").is_file()
    assert not list(cache.glob(".unpack-*"))


def test_a_cifar_archive_under_data_dir_is_checked_and_unpacked(tmp_path, rng, monkeypatch):
    """--data-dir DIR/cifar10/ holding the archive as downloaded (what the error message asks for) was refused:
    only unpacked batches counted. It is now checked against the registry's checksum and unpacked beside itself;
    with tarfile's data filter missing (Python < 3.10.12 / 3.11.4) links are refused by hand."""
    build = tmp_path / "build" / "cifar-10-batches-py"
    build.mkdir(parents=True)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(build / "data_batch_1", x, [0, 1, 2])
    write_cifar_batch(build / "test_batch", x[:1], [2])
    (tmp_path / "dd" / "cifar10").mkdir(parents=True)
    archive = tmp_path / "dd" / "cifar10" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(build, arcname="cifar-10-batches-py")
    monkeypatch.setitem(datasets.NAMED, "cifar10", Named("cifar", ("http://unused.invalid/",),
                                                         {"cifar-10-python.tar.gz": "md5:" + "0" * 32}))
    with pytest.raises(IgptError, match="cifar-10-python.tar.gz: checksum mismatch"):
        open_source("cifar10", data_dir=tmp_path / "dd")
    monkeypatch.setitem(datasets.NAMED, "cifar10", Named("cifar", ("http://unused.invalid/",),
                                                         {"cifar-10-python.tar.gz": md5(archive)}))
    monkeypatch.delattr(tarfile, "data_filter", raising=False)  # the fallback path of older Pythons
    src = open_source("cifar10", data_dir=tmp_path / "dd")
    assert src.splits["train"].n == 3 and src.splits["test"].n == 1
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(IgptError, match="refusing archive member 'cifar-10-batches-py/link'"):
        datasets._unpack(evil)


def test_registry_checksums_are_well_formed():
    for name, spec in datasets.NAMED.items():
        assert spec.urls and all(u.startswith("http") for u in spec.urls), name
        for fname, c in spec.checksums.items():
            algo, _, hexd = c.partition(":")
            assert algo in ("md5", "sha256") and len(hexd) == {"md5": 32, "sha256": 64}[algo], fname


def test_unknown_path_lists_named_sets(tmp_path):
    with pytest.raises(IgptError, match="not a named data set.*fashion-mnist-mini"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "one.PNG").write_bytes(b"\x89PNG")
    with pytest.raises(IgptError, match="a single image; --data takes a folder"):
        open_source(str(tmp_path / "one.PNG"))


@pytest.mark.shared_data
def test_shared_fashion_mnist_via_data_dir(shared_data):
    src = open_source("fashion-mnist", data_dir=shared_data)
    assert src.splits["train"].n == 60000 and src.splits["test"].n == 10000
    bundled = open_source("fashion-mnist-mini")
    a = next(src.splits["test"].chunks(8000))[0]
    b = next(bundled.splits["train"].chunks(8000))[0]
    assert np.array_equal(a, b)  # the bundled set is the real test set's first 8,000
