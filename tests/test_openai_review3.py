"""Readers of outside formats (named data sets, IDX files, CIFAR folders): problems found by the third review
of this area (seventeenth session)."""

from __future__ import annotations

import hashlib
import pickle
import re
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import collect, write_cifar_batch, write_idx

from igpt import datasets
from igpt.datasets import IDX_FILES, Named, open_source
from igpt.errors import IgptError


# 1. `--data DIR/cifar-100-python` (the folder itself, as the README lists it) was read as an image folder:
#    "no image files"; only its parent folder, or cifar-10-batches-py/ itself, worked
def test_the_cifar_100_python_folder_itself_is_a_cifar_source(tmp_path, rng):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(root / "train", x, [0, 99, 5, 7], key="fine_labels")
    write_cifar_batch(root / "test", x[:2], [3, 4], key="fine_labels")
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    src = open_source(str(root))
    assert sorted(src.splits) == ["test", "train"] and src.class_names[99] == "c99"
    imgs, labs = collect(src.splits["train"])
    assert np.array_equal(imgs, x) and list(labs) == [0, 99, 5, 7]


# 2. A CIFAR archive's ".unpacked" marker outlived the folder it vouched for (deleted by hand to unpack again):
#    `--data cifar10` then never unpacked it again ("not found there (expected cifar-10-python.tar.gz)", with the
#    archive right there; in the cache, "no CIFAR batches")
def _cifar_archive(tmp_path: Path, rng, dest: Path) -> Path:
    build = tmp_path / "build" / "cifar-10-batches-py"
    build.mkdir(parents=True, exist_ok=True)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(build / "data_batch_1", x, [0, 1, 2])
    write_cifar_batch(build / "test_batch", x[:1], [2])
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(build, arcname="cifar-10-batches-py")
    return archive


def test_a_stale_unpacked_marker_does_not_stop_unpacking_again(tmp_path, rng, monkeypatch):
    archive = _cifar_archive(tmp_path, rng, tmp_path / "dd" / "cifar10")
    digest = "md5:" + hashlib.md5(archive.read_bytes()).hexdigest()  # noqa: S324
    monkeypatch.setitem(datasets.NAMED, "cifar10", Named("cifar", ("http://unused.invalid/",), {archive.name: digest}))
    assert open_source("cifar10", data_dir=tmp_path / "dd").splits["train"].n == 3
    shutil.rmtree(archive.parent / "cifar-10-batches-py")  # the marker stays
    assert open_source("cifar10", data_dir=tmp_path / "dd").splits["train"].n == 3
    # the same in the cache (the archive was downloaded and verified before)
    cache = tmp_path / "cache" / "datasets" / "cifar10"
    shutil.copytree(archive.parent, cache)
    monkeypatch.setattr(datasets, "DEBIAN_ROOT", tmp_path / "nodeb")
    monkeypatch.delenv("IGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("IGPT_CACHE_DIR", str(tmp_path / "cache"))
    shutil.rmtree(cache / "cifar-10-batches-py")
    assert open_source("cifar10").splits["test"].n == 1


# 3. A download server whose answer is not HTTP (a mirror on the wrong port: an SSH banner) or whose
#    Content-Length is not a number ended in a traceback (http.client.BadStatusLine, ValueError)
class _RawServer:
    """Answers every connection with fixed bytes, whatever was asked."""

    def __init__(self, reply: bytes):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.recv(65536)
                c.sendall(self.reply)


@pytest.mark.parametrize("reply,msg", [
    (b"SSH-2.0-OpenSSH_8.9p1\r\n", "could not download mnist .*not a valid HTTP response .*BadStatusLine"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: many\r\n\r\nabc", "checksum mismatch for http"),  # read, then checked
])
def test_a_server_that_does_not_answer_http_is_a_one_line_error(tmp_path, monkeypatch, capsys, reply, msg):
    from igpt.cli import main

    srv = _RawServer(reply)
    try:
        monkeypatch.setitem(datasets.NAMED, "mnist", Named("idx", (srv.url,), {f: "md5:" + "0" * 32
                                                                              for f in IDX_FILES.values()}))
        monkeypatch.setattr(datasets, "DEBIAN_ROOT", tmp_path / "nodeb")
        monkeypatch.delenv("IGPT_DATA_DIR", raising=False)
        monkeypatch.delenv("IGPT_DATASET_MIRROR", raising=False)
        monkeypatch.setenv("IGPT_CACHE_DIR", str(tmp_path / "cache"))
        assert main(["prepare", "--data", "mnist", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert re.match("igpt: error: " + msg, err) and err.count("\n") == 1
        assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").rglob("*.part"))
    finally:
        srv.sock.close()


# 4. An IDX images file beside its labels file, one of the two gunzipped (`gunzip train-images-idx3-ubyte.gz`):
#    the labels were not found and the shards were written without labels, silently
@pytest.mark.parametrize("images,labels", [("train-images-idx3-ubyte", "train-labels-idx1-ubyte.gz"),
                                           ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte")])
def test_idx_labels_are_found_gzipped_or_not(tmp_path, rng, images, labels):
    x = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    y = np.array([3, 1, 4, 1, 5], np.uint8)
    write_idx(tmp_path / images, x)
    write_idx(tmp_path / labels, y)
    split = open_source(str(tmp_path / images)).splits["train"]
    assert split.labelled
    imgs, labs = collect(split)
    assert np.array_equal(np.stack(imgs)[..., 0], x) and list(labs) == [3, 1, 4, 1, 5]


# 5. An IDX labels file of the right length but the wrong rank ((N, 1)) was refused as "5 labels for 5 images"
def test_idx_labels_of_the_wrong_rank_are_named_as_such(tmp_path, rng):
    write_idx(tmp_path / "set-images-idx3-ubyte", rng.integers(0, 256, (5, 4, 4), dtype=np.uint8))
    write_idx(tmp_path / "set-labels-idx1-ubyte", np.zeros((5, 1), np.uint8))
    with pytest.raises(IgptError, match=r"labels of shape \(5, 1\) for 5 images"):
        open_source(str(tmp_path / "set-images-idx3-ubyte"))


def test_the_datasets_listing_names_the_mirror_it_would_download_from(monkeypatch, capsys):
    """`igpt datasets` printed the canonical URLs while $IGPT_DATASET_MIRROR, which replaces them, was set."""
    from igpt.cli import main

    monkeypatch.setenv("IGPT_DATASET_MIRROR", "http://mirror.example/igpt/")
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "downloaded from http://mirror.example/igpt/mnist/ ($IGPT_DATASET_MIRROR)" in out
    assert "amazonaws" not in out and "toronto.edu" not in out
    monkeypatch.delenv("IGPT_DATASET_MIRROR")
    assert main(["datasets"]) == 0 and "mirror.example" not in capsys.readouterr().out
