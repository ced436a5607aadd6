"""The image decoding policy on real files of each kind, and resizing to n_px x n_px."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt import images
from igpt.errors import IgptError


def save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


def test_decode_grey_rgb_cmyk(tmp_path, rng):
    g = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    out = images.decode_image(save(Image.fromarray(g), tmp_path / "g.png"))
    assert out.shape == (6, 5, 1) and np.array_equal(out[..., 0], g)
    c = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert np.array_equal(images.decode_image(save(Image.fromarray(c), tmp_path / "c.png")), c)
    bw = Image.fromarray(g > 127).convert("1")
    assert np.array_equal(images.decode_image(save(bw, tmp_path / "b.png"))[..., 0], np.where(g > 127, 255, 0))
    cmyk = Image.fromarray(c).convert("CMYK")
    out = images.decode_image(save(cmyk, tmp_path / "k.tif"))
    assert out.shape == (6, 5, 3) and np.array_equal(out, np.asarray(cmyk.convert("RGB")))


def test_decode_alpha_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], np.uint8)
    out = images.decode_image(save(Image.fromarray(rgba), tmp_path / "a.png"))
    assert out.tolist() == [[[255, 0, 0], [255, 255, 255], [127, 127, 255]]]
    la = Image.fromarray(np.array([[[0, 255], [0, 0], [100, 128]]], np.uint8).reshape(1, 3, 2), "LA")
    out = images.decode_image(save(la, tmp_path / "la.png"))
    assert out.shape == (1, 3, 1) and out[..., 0].tolist() == [[0, 255, 177]]
    # a PNG's transparent colour (tRNS) on RGB and on grey: that colour is transparent, as alpha 0 is
    rgb = Image.fromarray(np.array([[[10, 20, 30], [1, 2, 3]]], np.uint8))
    rgb.save(tmp_path / "trns.png", transparency=(10, 20, 30))
    assert images.decode_image(tmp_path / "trns.png").tolist() == [[[255, 255, 255], [1, 2, 3]]]
    Image.fromarray(np.array([[10, 7]], np.uint8)).save(tmp_path / "trns-l.png", transparency=10)
    assert images.decode_image(tmp_path / "trns-l.png")[..., 0].tolist() == [[255, 7]]


def test_decode_palette_images(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    assert images.decode_image(save(p, tmp_path / "p.png")).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    out = images.decode_image(save(p, tmp_path / "pt.png", transparency=1))  # colour 1 transparent -> white
    assert out.tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_decode_16bit_keeps_levels(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # every 8-bit level once, as 16-bit
    im = Image.fromarray(ramp)  # mode I;16
    out = images.decode_image(save(im, tmp_path / "r16.png"))
    assert out.shape == (16, 16, 1)
    assert np.array_equal(out[..., 0].ravel(), np.arange(256))  # scaled, not clipped to 255


def test_decode_exif_orientation(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = [255, 0, 0]  # red at top-left of the stored pixels
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = images.decode_image(save(im, tmp_path / "o.png", exif=exif))
    assert out.shape == (3, 2, 3)  # displayed upright: portrait
    assert out[0, 1].tolist() == [255, 0, 0]  # top-left moved to the top-right


def test_decode_bad_files_name_the_file(tmp_path, rng):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    with pytest.raises(IgptError, match="trunc.png: cannot decode"):
        images.decode_image(tmp_path / "trunc.png")
    with pytest.raises(IgptError, match="empty.png: an empty file"):
        images.decode_image(tmp_path / "empty.png")
    with pytest.raises(IgptError, match="text.jpg: not an image"):
        images.decode_image(tmp_path / "text.jpg")


def _png16(path, arr, colour_type: int, trns: bytes = b"") -> Path:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit grey + alpha): arr (H, W[, C]) uint16, colour
    type 0 grey, 2 RGB, 4 grey + alpha; ``trns`` the tRNS chunk's data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = arr.shape[:2]
    rows = b"".join(b"\0" + np.ascontiguousarray(arr[i]).astype(">u2").tobytes() for i in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + (chunk(b"tRNS", trns) if trns else b"") + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_16_bit_png_transparency_and_grey_alpha(tmp_path):
    """16-bit PNGs: grey + alpha stays grey (Pillow opens it as RGBA: a folder of them became RGB); a grey tRNS
    is composited on white (it was ignored); an RGB tRNS too (compared at the wrong scale, it matched nothing)."""
    import struct

    from igpt.data import _file_channels

    v = np.array([[0, 1000, 32768, 65535]], np.uint16)
    la = _png16(tmp_path / "la.png", np.stack([v, np.array([[65535, 0, 65535, 65535]], np.uint16)], -1), 4)
    out = images.decode_image(la)
    assert out.shape == (1, 4, 1) and out[0, :, 0].tolist() == [0, 255, 128, 255]  # alpha 0 -> white
    assert _file_channels(la) == 1
    grey = _png16(tmp_path / "g.png", v, 0, trns=struct.pack(">H", 1000))
    assert images.decode_image(grey)[0, :, 0].tolist() == [0, 255, 128, 255]  # 1000 is transparent
    rgb = _png16(tmp_path / "c.png", np.stack([v] * 3, -1), 2, trns=struct.pack(">HHH", 1000, 1000, 1000))
    assert images.decode_image(rgb)[0, :, 0].tolist() == [0, 255, 128, 255]


FIXTURES = Path(__file__).with_name("fixtures") / "damaged"


@pytest.mark.parametrize("name, cause", [("exif_struct_error.jpg", "error"), ("exif_type_error.jpg", "TypeError"),
                                         ("tiff16_type_error.tif", "TypeError")])
def test_damaged_files_that_break_pillow_otherwise_are_one_line_errors(name, cause, tmp_path):
    """Files from fuzzing (damaged EXIF of a JPEG, a damaged 16-bit TIFF) on which Pillow raises struct.error
    or TypeError, which escaped as tracebacks (and past --skip-bad) until the thirteenth session."""
    with pytest.raises(IgptError, match=f"{name}: cannot decode image \\({cause}"):
        images.decode_image(FIXTURES / name)
    good = tmp_path / "imgs"
    good.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good / "ok.png")
    (good / name).write_bytes((FIXTURES / name).read_bytes())
    from conftest import collect

    from igpt.data import folder_source

    with pytest.raises(IgptError, match=name):
        collect(folder_source(good).splits["train"])
    split = folder_source(good, skip_bad=True).splits["train"]  # --skip-bad now skips it
    assert len(collect(split)[0]) == 1 and split.skipped == [str(good / name)]


def test_to_square_crop_and_filters(rng):
    img = rng.integers(0, 256, (10, 16, 3), dtype=np.uint8)
    sq = images.to_square(img, 10)  # crop only: the centre 10 columns
    assert np.array_equal(sq, img[:, 3:13])
    small = images.to_square(img, 5)
    blocks = img[:, 3:13].astype(np.float64).reshape(5, 2, 5, 2, 3).mean((1, 3))  # a whole factor: block means
    assert np.array_equal(small, np.floor(blocks + 0.5))
    assert images.to_square(img[..., :1], 20).shape == (20, 20, 1)


def exact_area(img: np.ndarray, n: int) -> np.ndarray:
    """Area averaging by supersampling: every source pixel repeated n times per axis (s*n), then the mean of
    each s x s block: each output pixel averages exactly the source area it covers, fractions included."""
    s = img.shape[0]
    up = img.astype(np.float64).repeat(n, 0).repeat(n, 1)
    return up.reshape(n, s, n, s, -1).mean((1, 3))


@pytest.mark.parametrize("s, n", [(28, 16), (28, 12), (32, 12), (13, 5)])
def test_shrinking_averages_the_area_of_each_output_pixel(rng, s, n):
    """Pillow's BOX filter (used until the fourteenth session) is area averaging at whole factors only: at
    28 -> 16 every fourth output pixel was one source column (a 0/255 column stripe came out 128, 128, 0, ...)."""
    img = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    out = images.to_square(img, n)
    assert np.abs(out - exact_area(img, n)).max() <= 0.5 + 1e-3  # rounding only
    stripes = np.zeros((s, s, 1), np.uint8)
    stripes[:, 1::2] = 255
    assert np.abs(images.to_square(stripes, n) - exact_area(stripes, n)).max() <= 0.5 + 1e-3
    batch = rng.integers(0, 256, (4, s + 3, s, 1), dtype=np.uint8)  # one size, not square: the batched path
    assert np.array_equal(images.resize_batch(batch, n), np.stack([images.to_square(b, n) for b in batch]))



@pytest.mark.shared_data
def test_real_files_decode(shared_data):
    emoji = sorted((shared_data / "emoji" / "animals-nature").glob("*.png"))[:5]
    for f in emoji:
        with Image.open(f) as im:
            assert im.mode in ("RGBA", "P", "RGB")
        out = images.decode_image(f)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    jpg = sorted((shared_data / "samples" / "imagenet").glob("*.jpg"))[0]
    assert images.decode_image(jpg).shape == (512, 512, 3)
