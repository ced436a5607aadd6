"""The data readers and importers with damaged or hostile input (found by a review in the fifteenth session)."""

from __future__ import annotations

import pickle
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import collect, write_cifar_batch

from igpt.errors import IgptError

CENTERS = Path(__file__).parent / "fixtures" / "openai" / "kmeans_centers.npy"


# 1. tfcheckpoint: a header claiming 2**40 shards makes reading a partitioned tensor stat() 2**40 paths
def test_partitioned_read_with_absurd_shard_count_does_not_hang(tmp_path):
    from tf_writer import entry, field, write

    from igpt.crc32c import crc32c
    from igpt.tfcheckpoint import TFCheckpoint, slice_key

    half = np.arange(2, dtype="<f4").tobytes()
    entries = {b"x": entry(dims=(2,), slices=[((0, 2),)]),
               slice_key("x", ((0, 2),)): entry(dims=(2,), size=8, crc=crc32c(half))}
    ck = TFCheckpoint(write(tmp_path / "m", entries, [half], header=field(1, 2**40)))

    def too_slow(*_):
        raise TimeoutError("still looping over the declared shards after 30 s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(30)
    try:
        with pytest.raises(IgptError, match="m.index: tensor 'x'"):
            ck.read("x")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# 2. openai-npy: a damaged header or a zip renamed .npy escapes _load as TokenError / AttributeError
@pytest.mark.parametrize("damage", ["zip", "unclosed_brace"])
@pytest.mark.parametrize("which", ["trX.npy", "trY.npy"])
def test_openai_npy_damaged_files_are_one_line_errors(tmp_path, damage, which):
    from igpt.prepare import PrepareConfig, prepare

    d = tmp_path / "dl"
    d.mkdir()
    np.save(d / "trX.npy", np.zeros((4, 16), np.int64), allow_pickle=False)
    np.save(d / "trY.npy", np.eye(2, dtype=np.float32)[[0, 1, 0, 1]], allow_pickle=False)
    f = d / which
    if damage == "zip":
        np.savez(tmp_path / "z.npz", x=np.load(f))
        shutil.copy(tmp_path / "z.npz", f)
    else:
        f.write_bytes(f.read_bytes().replace(b"}", b" ", 1))  # one byte of the header dict changed
    with pytest.raises(IgptError, match=which):
        prepare(PrepareConfig(out=str(tmp_path / "s"), data=f"openai-npy:{d}", palette=str(CENTERS)))


# 3. cifar: a stray data_batch_1.bak beside the batches is a ValueError traceback
def test_cifar_folder_with_backup_batch_file(tmp_path, rng):
    from igpt.cifar import cifar_source

    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(tmp_path / "data_batch_1", x, [0, 1, 2])
    shutil.copy(tmp_path / "data_batch_1", tmp_path / "data_batch_1.bak")
    try:
        imgs, labs = collect(cifar_source(tmp_path).splits["train"])
    except IgptError as e:  # refusing it clearly is fine too
        assert "data_batch_1.bak" in str(e)
    else:
        assert np.array_equal(imgs, x) and list(labs) == [0, 1, 2]


# 4. cifar: a damaged batches.meta is a TypeError / UnicodeDecodeError traceback
@pytest.mark.parametrize("names", [5, [b"\xff\xfe"]])
def test_cifar_damaged_meta_is_a_one_line_error(tmp_path, rng, names):
    from igpt.cifar import cifar_source

    write_cifar_batch(tmp_path / "data_batch_1", rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), [0, 1])
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    with pytest.raises(IgptError, match="batches.meta"):
        cifar_source(tmp_path)


# 5. cifar: uint64 labels >= 2**63 wrap to negative int64 and pass prepare (load_shards then refuses the shards)
def test_cifar_uint64_labels_beyond_int64_are_refused_when_read(tmp_path, rng):
    from igpt.cifar import cifar_source

    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    labels = np.array([1, 2**63, 0, 1], dtype=np.uint64)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
    with pytest.raises(IgptError, match="data_batch_1"):
        collect(cifar_source(tmp_path).splits["train"])


# 6. openai-npy: --test-fraction is silently ignored when there is no teX (meta.json records it all the same)
def test_openai_npy_honours_test_fraction(tmp_path):
    from igpt.prepare import PrepareConfig, prepare

    d = tmp_path / "dl"
    d.mkdir()
    np.save(d / "trX.npy", np.random.default_rng(0).integers(0, 16, (20, 16)), allow_pickle=False)
    meta = prepare(PrepareConfig(out=str(tmp_path / "s"), data=f"openai-npy:{d}", palette=str(CENTERS),
                                 test_fraction=0.2))
    assert meta["config"]["test_fraction"] == 0.2
    assert meta["counts"].get("test") == 4  # as for every other source: round(20 * 0.2) held out of train


# 7. image folders: a chunk holds chunk_size (2048) images at full size before resizing: memory follows image size
def test_folder_reader_memory_does_not_grow_with_image_size(tmp_path):
    import tracemalloc

    from PIL import Image

    from igpt.datasets import open_source

    for i in range(12):  # 12 MiB each when decoded, ~40 KB each on disk
        Image.new("RGB", (2048, 2048), (i * 20, 255 - i * 20, 128)).save(tmp_path / f"{i:02d}.png")
    src = open_source(str(tmp_path))
    tracemalloc.start()
    try:
        n = sum(len(imgs) for imgs, _ in src.splits["train"].chunks(2048))  # prepare's default chunk_size
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert n == 12
    assert peak < 100, f"{peak:.0f} MiB held for 12 images"


# 8. images: Pillow picks the decoder from the content, not the name: a PostScript file named x.png is handed to
#    Ghostscript (an interpreter of the file's program) wherever `gs` is installed
def test_image_named_png_holding_postscript_never_runs_ghostscript(tmp_path, monkeypatch):
    import subprocess

    import PIL.EpsImagePlugin as eps

    from igpt.datasets import open_source
    from igpt.images import decode_image

    ran = []

    def spy(cmd, *a, **k):
        ran.append(cmd[0])
        raise OSError("spy: Ghostscript would have run")

    monkeypatch.setattr(eps, "gs_binary", "gs")  # as on a machine with Ghostscript installed
    monkeypatch.setattr(subprocess, "check_call", spy)
    f = tmp_path / "cat" / "x.png"
    f.parent.mkdir()
    f.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n(hi) print\nshowpage\n%%EOF\n")
    with pytest.raises(IgptError, match="x.png"):
        decode_image(f)
    with pytest.raises(IgptError, match="x.png"):
        collect(open_source(str(tmp_path)).splits["train"])
    assert ran == []

