"""Data sources and the image decoding policy, on files made here and on the real files in ../shared/data."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from conftest import write_cifar_batch, write_idx
from PIL import Image

from igpt import data
from igpt.errors import IgptError


def collect(split, chunk=3):
    imgs, labs = [], []
    for x, y in split.chunks(chunk):
        imgs += list(x)
        if y is not None:
            labs += list(y)
    return np.stack(imgs), (np.array(labs) if labs else None)


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


# -- CIFAR --------------------------------------------------------------------------------------------------
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
    src = data.cifar_source(tmp_path)  # the folder holding cifar-10-batches-py/
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
    src = data.cifar_source(root)
    imgs, labs = collect(src.splits["train"])
    assert np.array_equal(imgs, x) and list(labs) == [0, 99, 5, 7] and "test" not in src.splits


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_cifar_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(IgptError, match="data_batch_1.*not allowed"):
        data.cifar_source(tmp_path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_cifar_malformed(tmp_path):
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(IgptError, match="uint8 array \\(N, 3072\\)"):
        collect(data.cifar_source(tmp_path / "b").splits["train"])
    (tmp_path / "c").write_bytes(b"not a pickle at all")
    with pytest.raises(IgptError, match="not a valid CIFAR"):
        data.read_cifar_batch(tmp_path / "c")


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


# -- decoding policy ----------------------------------------------------------------------------------------
def save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


def test_decode_grey_rgb_cmyk(tmp_path, rng):
    g = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    out = data.decode_image(save(Image.fromarray(g), tmp_path / "g.png"))
    assert out.shape == (6, 5, 1) and np.array_equal(out[..., 0], g)
    c = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert np.array_equal(data.decode_image(save(Image.fromarray(c), tmp_path / "c.png")), c)
    bw = Image.fromarray(g > 127).convert("1")
    assert np.array_equal(data.decode_image(save(bw, tmp_path / "b.png"))[..., 0], np.where(g > 127, 255, 0))
    cmyk = Image.fromarray(c).convert("CMYK")
    out = data.decode_image(save(cmyk, tmp_path / "k.tif"))
    assert out.shape == (6, 5, 3) and np.array_equal(out, np.asarray(cmyk.convert("RGB")))


def test_decode_alpha_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], np.uint8)
    out = data.decode_image(save(Image.fromarray(rgba), tmp_path / "a.png"))
    assert out.tolist() == [[[255, 0, 0], [255, 255, 255], [127, 127, 255]]]
    la = Image.fromarray(np.array([[[0, 255], [0, 0], [100, 128]]], np.uint8).reshape(1, 3, 2), "LA")
    out = data.decode_image(save(la, tmp_path / "la.png"))
    assert out.shape == (1, 3, 1) and out[..., 0].tolist() == [[0, 255, 177]]


def test_decode_palette_images(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    assert data.decode_image(save(p, tmp_path / "p.png")).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    out = data.decode_image(save(p, tmp_path / "pt.png", transparency=1))  # colour 1 transparent -> white
    assert out.tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_decode_16bit_keeps_levels(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # every 8-bit level once, as 16-bit
    im = Image.fromarray(ramp)  # mode I;16
    out = data.decode_image(save(im, tmp_path / "r16.png"))
    assert out.shape == (16, 16, 1)
    assert np.array_equal(out[..., 0].ravel(), np.arange(256))  # scaled, not clipped to 255


def test_decode_exif_orientation(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = [255, 0, 0]  # red at top-left of the stored pixels
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = data.decode_image(save(im, tmp_path / "o.png", exif=exif))
    assert out.shape == (3, 2, 3)  # displayed upright: portrait
    assert out[0, 1].tolist() == [255, 0, 0]  # top-left moved to the top-right


def test_decode_bad_files_name_the_file(tmp_path, rng):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    with pytest.raises(IgptError, match="trunc.png: cannot decode"):
        data.decode_image(tmp_path / "trunc.png")
    with pytest.raises(IgptError, match="empty.png: an empty file"):
        data.decode_image(tmp_path / "empty.png")
    with pytest.raises(IgptError, match="text.jpg: not an image"):
        data.decode_image(tmp_path / "text.jpg")


def test_to_square_crop_and_filters(rng):
    img = rng.integers(0, 256, (10, 16, 3), dtype=np.uint8)
    sq = data.to_square(img, 10)  # crop only: the centre 10 columns
    assert np.array_equal(sq, img[:, 3:13])
    small = data.to_square(img, 5)
    ref = np.asarray(Image.fromarray(img[:, 3:13]).resize((5, 5), Image.Resampling.BOX))
    assert np.array_equal(small, ref)
    blocks = img[:, 3:13].astype(np.float64).reshape(5, 2, 5, 2, 3).mean((1, 3))  # box = area average
    assert np.abs(small - blocks).max() <= 1
    assert data.to_square(img[..., :1], 20).shape == (20, 20, 1)


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


@pytest.mark.shared_data
def test_real_files_decode(shared_data):
    emoji = sorted((shared_data / "emoji" / "animals-nature").glob("*.png"))[:5]
    for f in emoji:
        with Image.open(f) as im:
            assert im.mode in ("RGBA", "P", "RGB")
        out = data.decode_image(f)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    jpg = sorted((shared_data / "samples" / "imagenet").glob("*.jpg"))[0]
    assert data.decode_image(jpg).shape == (512, 512, 3)
