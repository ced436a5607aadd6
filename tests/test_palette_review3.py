"""Third review of palettes, k-means and image decoding: the cases each test names."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from igpt import images
from igpt.errors import IgptError
from igpt.palette import Palette


def _png_low_bit(path: Path, values: list[int], depth: int, trns: int) -> Path:
    """A one-row grey PNG of bit depth 1, 2 or 4 with a tRNS chunk (the transparent grey, at that depth), written
    by hand: PNG optimisers (optipng, oxipng, pngcrush) store few-level images with binary alpha this way."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bits = "".join(format(v, f"0{depth}b") for v in values)
    bits += "0" * (-len(bits) % 8)
    row = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", len(values), 1, depth, 0, 0, 0, 0))
                     + chunk(b"tRNS", struct.pack(">H", trns)) + chunk(b"IDAT", zlib.compress(b"\0" + row))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("depth, values, trns, want", [
    (1, [0, 1, 0, 1], 0, [255, 255, 255, 255]),  # black transparent: all white (the black stayed black)
    (2, [0, 3, 1, 2], 1, [0, 255, 255, 170]),  # 85 transparent (Pillow compared the pixels with 1)
    (4, [0, 15, 5, 9], 5, [0, 255, 255, 153]),  # 85 transparent (compared with 5)
])
def test_low_bit_depth_grey_png_transparency_is_composited_on_white(tmp_path, depth, values, trns, want):
    """A 1-, 2- or 4-bit grey PNG's transparent grey (tRNS) is composited on white, as the README's policy says
    of "a PNG's transparent grey": Pillow opens them as mode 1 / L but leaves the 1-bit tRNS to no conversion
    (mode 1 was read with convert('L'), transparency ignored) and keeps the 2- and 4-bit tRNS value unscaled
    while it scales the pixels to 8 bits, so the transparent background came out black or its own grey."""
    from igpt.data import _file_channels

    f = _png_low_bit(tmp_path / "icon.png", values, depth, trns)
    out = images.decode_image(f)
    assert out.shape == (1, 4, 1) and out[0, :, 0].tolist() == want
    assert _file_channels(f) == 1  # still grey


def test_a_json_palette_of_bad_values_names_its_file(tmp_path):
    f = tmp_path / "preprocessor_config.json"
    f.write_text(json.dumps({"clusters": [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]}))  # 5 is outside [-1, 1]
    with pytest.raises(IgptError, match=r"preprocessor_config.json: "):
        Palette.load(f)
