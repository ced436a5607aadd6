"""Data sources (IDX, numpy arrays, image folders) and the image decoding policy, on files made here and on the
real files in ../shared/data (CIFAR batches: test_cifar.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import collect, write_idx
from PIL import Image

from igpt import data
from igpt.errors import IgptError


# -- IDX ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, rng, suffix):
    x = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    y = rng.integers(0, 10, 7, dtype=np.uint8)
    xi = write_idx(tmp_path / f"imgs-idx3-ubyte{suffix}", x)
    yi = write_idx(tmp_path / f"labels-idx1-ubyte{suffix}", y)
    assert np.array_equal(data.read_idx(xi), x)
    imgs, labs = collect(data.idx_split(xi, yi))
    assert imgs.shape == (7, 5, 6, 1) and np.array_equal(imgs[..., 0], x) and np.array_equal(labs, y)
    imgs, labs = collect(data.idx_split(xi, yi, 2, 5), chunk=2)  # a sub-range, as the bundled split uses
    assert np.array_equal(imgs[..., 0], x[2:5]) and np.array_equal(labs, y[2:5])


def test_idx_bad_files(tmp_path, rng):
    x = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
    good = write_idx(tmp_path / "a-idx3-ubyte", x).read_bytes()
    (tmp_path / "trunc").write_bytes(good[:-5])
    with pytest.raises(IgptError, match="trunc.*truncated"):
        collect(data.idx_split(tmp_path / "trunc", None))
    (tmp_path / "magic").write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(IgptError, match="magic.*bad magic"):
        data.read_idx(tmp_path / "magic")
    (tmp_path / "huge").write_bytes(bytes([0, 0, 8, 3]) + (10**6).to_bytes(4, "big") * 3)
    with pytest.raises(IgptError, match="too large"):  # refused from the header, before allocating
        data.read_idx(tmp_path / "huge")
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0" * 4)
    with pytest.raises(IgptError, match="0x0d"):
        data.read_idx(tmp_path / "float")
    write_idx(tmp_path / "l-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(IgptError, match="3 labels for 4 images"):
        data.idx_split(tmp_path / "a-idx3-ubyte", tmp_path / "l-idx1-ubyte")


# -- numpy arrays -------------------------------------------------------------------------------------------
def test_npz_layouts_and_npy(tmp_path, rng):
    x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    y = np.arange(6)
    np.savez(tmp_path / "a.npz", images=x, labels=y, class_names=np.array([f"c{i}" for i in range(6)]))
    src = data.array_source(tmp_path / "a.npz")
    imgs, labs = collect(src.splits["train"])
    assert src.channels == 3 and np.array_equal(imgs, x) and np.array_equal(labs, y) and src.class_names[5] == "c5"
    np.savez_compressed(tmp_path / "k.npz", x_train=x[:4, ..., 0], y_train=y[:4], x_test=x[4:, ..., 0], y_test=y[4:])
    src = data.array_source(tmp_path / "k.npz")
    assert src.channels == 1 and set(src.splits) == {"train", "test"}
    assert np.array_equal(collect(src.splits["test"])[0][..., 0], x[4:, ..., 0])
    np.save(tmp_path / "b.npy", x)
    imgs, labs = collect(data.array_source(tmp_path / "b.npy").splits["train"])
    assert np.array_equal(imgs, x) and labs is None
    x16 = (np.arange(256, dtype=np.uint16) * 257).reshape(1, 16, 16)  # 16-bit levels scale to all 256 8-bit ones
    np.save(tmp_path / "c.npy", x16)
    imgs, _ = collect(data.array_source(tmp_path / "c.npy").splits["train"])
    assert np.array_equal(imgs.ravel(), np.arange(256))


def test_npy_objects_and_bad_arrays_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(IgptError, match="o.npy.*pickled"):
        data.array_source(tmp_path / "o.npy")
    np.save(tmp_path / "f.npy", np.zeros((2, 4, 4), np.float32))
    with pytest.raises(IgptError, match="uint8"):
        data.array_source(tmp_path / "f.npy")
    np.save(tmp_path / "s.npy", np.zeros((2, 3, 8, 8), np.uint8))  # channels first: refused
    with pytest.raises(IgptError, match="shape"):
        data.array_source(tmp_path / "s.npy")
    np.savez(tmp_path / "n.npz", foo=np.zeros(3))
    with pytest.raises(IgptError, match="no image array"):
        data.array_source(tmp_path / "n.npz")
    np.savez(tmp_path / "l.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(IgptError, match="labels"):
        data.array_source(tmp_path / "l.npz")


def test_labels_and_sizes_that_shards_cannot_hold_are_refused_when_read(tmp_path):
    """Negative labels, uint64 labels beyond int64 (they wrapped to negative numbers) and images of zero height
    or width passed `prepare` (the shards were then refused by every later step, or held black images)."""
    x = np.zeros((3, 4, 4), np.uint8)
    for name, y in (("neg", np.array([-1, 0, 1])), ("big", np.array([0, 1, 2**63 + 5], np.uint64))):
        np.savez(tmp_path / f"{name}.npz", images=x, labels=y)
        with pytest.raises(IgptError, match=f"{name}.npz\\[images\\]: labels must be in 0 .. 2\\*\\*63 - 1"):
            data.array_source(tmp_path / f"{name}.npz")
    np.save(tmp_path / "zero.npy", np.zeros((5, 0, 0, 3), np.uint8))
    with pytest.raises(IgptError, match="zero.npy.*images of 0x0 pixels"):
        data.array_source(tmp_path / "zero.npy")
    write_idx(tmp_path / "z-idx3-ubyte", np.zeros((5, 0, 28), np.uint8))
    with pytest.raises(IgptError, match="z-idx3-ubyte: expected an IDX image file .* with H, W >= 1"):
        data.idx_split(tmp_path / "z-idx3-ubyte", None)


def test_hidden_files_and_short_class_name_lists(tmp_path, rng):
    """macOS's '._name.png' resource forks in class folders stopped the run as bad images (or were 'skipped');
    an .npz whose class_names list is shorter than its label range was accepted (labels without names)."""
    make_folder(tmp_path / "a", rng, per=2)
    (tmp_path / "a" / "cat" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    imgs, labs = collect(data.folder_source(tmp_path / "a").splits["train"])
    assert len(imgs) == 4 and labs.tolist() == [0, 0, 1, 1]
    np.savez(tmp_path / "c.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1, 2]),
             class_names=np.array(["a", "b"]))
    with pytest.raises(IgptError, match="c.npz: 2 class_names for labels up to 2"):
        data.array_source(tmp_path / "c.npz")


@pytest.mark.parametrize("dtype, channels", [(np.uint16, 3), (np.uint8, 4)])
def test_16_bit_and_alpha_arrays_are_converted_chunk_by_chunk(tmp_path, rng, dtype, channels):
    """A memory-mapped .npy of 16-bit or RGBA images is converted per chunk (it was converted whole, several
    uint32 copies of the file in memory, before the first chunk): reading a chunk allocates about a chunk."""
    import tracemalloc

    x = rng.integers(0, np.iinfo(dtype).max + 1, (6000, 32, 32, channels)).astype(dtype)
    np.save(tmp_path / "a.npy", x)
    tracemalloc.start()
    split = data.array_source(tmp_path / "a.npy").splits["train"]
    first = next(split.read(64))[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes / 4, (peak, x.nbytes)  # the whole array's conversion took > 2x its size
    assert np.array_equal(first, data.normalise_array(x[:64], "x"))
    assert first.shape == (64, 32, 32, 3) and first.dtype == np.uint8


# -- image folders ------------------------------------------------------------------------------------------
def make_folder(root, rng, classes=("cat", "dog"), per=3, mode="RGB"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            a = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(a).convert(mode).save(root / c / f"{i}.png")


def test_folder_classes_flat_and_splits(tmp_path, rng):
    make_folder(tmp_path / "a", rng)
    src = data.folder_source(tmp_path / "a")
    imgs, labs = collect(src.splits["train"])
    assert src.class_names == ["cat", "dog"] and src.channels == 3 and list(labs) == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(imgs[0], np.asarray(Image.open(tmp_path / "a" / "cat" / "0.png")))
    src = data.folder_source(tmp_path / "a" / "dog")  # flat: no labels
    imgs, labs = collect(src.splits["train"])
    assert labs is None and len(imgs) == 3 and src.class_names is None
    make_folder(tmp_path / "s" / "train", rng, per=2, mode="L")
    make_folder(tmp_path / "s" / "test", rng, per=1, mode="L")
    src = data.folder_source(tmp_path / "s")
    assert set(src.splits) == {"train", "test"} and src.channels == 1 and src.splits["test"].n == 2


def test_folder_mixed_channels_become_rgb(tmp_path, rng):
    make_folder(tmp_path, rng, classes=("a",), per=2, mode="L")
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "a" / "z.png")
    src = data.folder_source(tmp_path)
    imgs, _ = collect(src.splits["train"])
    assert src.channels == 3 and imgs.shape == (3, 12, 12, 3)
    assert np.array_equal(imgs[0, ..., 0], imgs[0, ..., 2])  # a grey image repeated into RGB


def test_folder_bad_file_error_or_skip(tmp_path, rng):
    make_folder(tmp_path, rng, classes=("a",), per=2)
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(IgptError, match="1.png"):
        collect(data.folder_source(tmp_path).splits["train"])
    split = data.folder_source(tmp_path, skip_bad=True).splits["train"]
    imgs, labs = collect(split)
    assert len(imgs) == 1 and len(labs) == 1 and split.skipped == [str(tmp_path / "a" / "1.png")]


def test_folder_without_images(tmp_path):
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(IgptError, match="no image files"):
        data.folder_source(tmp_path)
