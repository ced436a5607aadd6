"""Image files -> uint8 arrays: the decoding policy, channel conversion and resizing to n_px x n_px.

Decoding policy for image files (``decode_image``):
- grey (L, 1-bit, 16-bit grey with or without alpha) stays grey; RGB stays RGB; CMYK, YCbCr, LAB and HSV are
  converted to RGB;
- an alpha channel (RGBA, LA, PA, P with transparency, and a PNG's transparent grey or colour, tRNS: grey of
  1, 2, 4, 8 or 16 bits, RGB of 8 or 16; a 16-bit colour tRNS is matched on the high bytes, all Pillow keeps) is
  composited on white;
- palette images (P) are expanded to RGB;
- 16-bit grey images (I;16*, I) are scaled to 8 bits (v * 255 / 65535, rounded), never clipped; 16-bit-per-channel
  colour PNGs come from Pillow as 8-bit RGB(A) holding each value's high byte (v // 256: at most one level
  below the rounded value);
- the EXIF orientation is applied;
- truncated, empty, damaged or non-image files raise ``IgptError`` naming the file (or are skipped with skip_bad):
  any exception of Pillow's decoders (damaged EXIF raises struct.error or TypeError, a damaged TIFF TypeError).
Resizing (``to_square``): a non-square image is centre-cropped to a square, then resized to n_px x n_px by
area averaging when shrinking (each output pixel the mean of the source area it covers, fractions of pixels
included: ``area_resize``) and bilinear when enlarging. Pillow's BOX filter, used until the fourteenth session,
is area averaging only at whole factors: at 28 -> 16 it gives every fourth output pixel one source column,
which aliases (a 0/255 column stripe came out 128, 128, 0, 128, ... instead of 109, 109, 109, 109, 146, ...).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from igpt.errors import IgptError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
# the decoders Image.open may use (it picks one by content, not by name): those of IMAGE_EXTS only; EPS, for one,
# would hand the file's PostScript program to Ghostscript
FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "WEBP", "TIFF", "PPM")
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C + 1) with alpha last -> uint8 (H, W, C), composited on a white background."""
    c = rgba[..., :-1].astype(np.uint32)
    a = rgba[..., -1:].astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def raw_mode(im: Image.Image) -> str | None:
    """The file's own pixel layout as Pillow's decoder reads it (e.g. 'LA;16B', 'RGB;16B' for 16-bit PNGs), which
    the mode hides: Pillow opens 16-bit grey + alpha PNGs as RGBA and 16-bit RGB as 8-bit RGB. Read it before
    ``load()``, which clears the tile list."""
    if not im.tile:
        return None
    args = im.tile[0][3]
    return args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else None)


def is_grey(im: Image.Image) -> bool:
    """Whether the decoding policy gives this (unloaded) image one channel."""
    return im.mode in GREY_MODES or raw_mode(im) == "LA;16B"


def _to_array(im: Image.Image, path: Path, raw: str | None = None) -> np.ndarray:
    """A decoded PIL image -> uint8 (H, W, 1 or 3) under the policy in the module docstring (``raw``: see
    ``raw_mode``)."""
    mode = im.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        a = np.asarray(im).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise IgptError(f"{path}: integer image with values outside 0..65535 is not supported")
        out = ((a * 255 + 32767) // 65535).astype(np.uint8)
        t = im.info.get("transparency")
        if isinstance(t, int):  # a 16-bit PNG's transparent grey (tRNS), compared at 16 bits: white there
            out[a == t] = 255
        return out[..., None]
    if mode == "RGBA" and raw == "LA;16B":  # 16-bit grey + alpha, opened as RGBA (R = G = B): grey on white
        return composite_on_white(np.asarray(im)[..., [0, 3]])
    if mode == "RGB" and raw == "RGB;16B" and isinstance(im.info.get("transparency"), tuple):
        # Pillow keeps the 16-bit tRNS colour but only the high bytes of the pixels (and then compares the two
        # at different scales, so convert('RGBA') marks nothing): compare high bytes, the finest it allows
        a = np.asarray(im)
        hit = (a == np.array([v >> 8 for v in im.info["transparency"]], np.uint8)).all(-1, keepdims=True)
        return np.where(hit, np.uint8(255), a)
    if mode == "F":
        raise IgptError(f"{path}: floating-point images (mode F) are not supported; save it as 8 or 16 bit")
    if mode in ("1", "L") and isinstance(im.info.get("transparency"), int):  # a PNG's transparent grey (tRNS)
        t = im.info["transparency"]
        if raw in ("L;2", "L;4"):  # Pillow scales 2- and 4-bit pixels to 8 bits but keeps tRNS at the file's
            t = t * 255 // ((1 << int(raw[-1])) - 1)  # depth (so it matched nothing, or another grey)
        a = np.asarray(im.convert("L"))  # mode 1 (0 / 255) comes with its tRNS already at 0 or 255
        return np.where(a == t, np.uint8(255), a)[..., None]  # transparent: white, as composite_on_white gives
    if mode in ("LA", "La") or (mode == "L" and "transparency" in im.info):  # alpha, or a PNG tRNS grey
        return composite_on_white(np.asarray(im.convert("LA")))
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"))[..., None]
    if mode == "RGB" and "transparency" in im.info:  # a PNG tRNS colour: that colour is transparent
        return composite_on_white(np.asarray(im.convert("RGBA")))
    if mode == "RGB":
        return np.asarray(im)
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        return composite_on_white(np.asarray(im.convert("RGBA")))
    return np.asarray(im.convert("RGB"))  # P, CMYK, YCbCr, LAB, HSV, ...


def decode_image(path: str | Path) -> np.ndarray:
    """Decode one image file -> uint8 (H, W, 1) or (H, W, 3); ``IgptError`` naming the file if it can't."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as im:
                raw = raw_mode(im)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_array(im, path, raw)
    except IgptError:
        raise
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        what = "an empty file" if size == 0 else "not an image Pillow can read"
        raise IgptError(f"{path}: {what}") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise struct.error, TypeError, ... on damaged data
        raise IgptError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def convert_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W, c) -> (H, W, channels): grey repeated to RGB, or RGB to grey with ITU-R 601-2 luma."""
    if img.shape[-1] == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=-1)
    return np.asarray(Image.fromarray(img).convert("L"))[..., None]


@lru_cache(maxsize=64)
def area_weights(s: int, n: int) -> np.ndarray:
    """(n, s) float32: row i holds the share of output pixel i's footprint [i s/n, (i+1) s/n) that each
    source pixel [j, j+1) covers (each row sums to 1)."""
    edges = np.arange(n + 1) * (s / n)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(s)[None]
    return (np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None) * (n / s)).astype(np.float32)


def area_resize(x: np.ndarray, n: int) -> np.ndarray:
    """uint8 (b, s, s, C) -> (b, n, n, C) for n <= s: the mean over each output pixel's area (separable),
    rounded half up."""
    a = area_weights(x.shape[1], n)
    y = np.matmul(a, x.astype(np.float32).transpose(0, 3, 1, 2))  # (b, C, n, s): rows
    y = np.matmul(y, a.T)  # (b, C, n, n): columns
    return np.floor(y + 0.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def center_square(img: np.ndarray) -> np.ndarray:
    """(..., H, W, C) -> (..., s, s, C), s = min(H, W): the centre crop."""
    h, w = img.shape[-3:-1]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[..., top : top + s, left : left + s, :]


def to_square(img: np.ndarray, n_px: int) -> np.ndarray:
    """uint8 (H, W, C) -> (n_px, n_px, C): centre crop to a square, then area average down / bilinear up."""
    img = center_square(img)
    s, c = img.shape[0], img.shape[-1]
    if s == n_px:
        return np.ascontiguousarray(img)
    if s > n_px:
        return area_resize(img[None], n_px)[0]
    out = np.asarray(Image.fromarray(img[..., 0] if c == 1 else img).resize((n_px, n_px), Image.Resampling.BILINEAR))
    return out[..., None] if c == 1 else out


def resize_batch(images: list[np.ndarray] | np.ndarray, n_px: int) -> np.ndarray:
    """A chunk of images (each (H, W, C) uint8) -> one uint8 array (b, n_px, n_px, C)."""
    if isinstance(images, np.ndarray) and images.shape[1:3] == (n_px, n_px):
        return np.ascontiguousarray(images)
    if isinstance(images, np.ndarray) and len(images) and min(images.shape[1:3]) > n_px:  # one size: at once
        return area_resize(center_square(images), n_px)
    return np.stack([to_square(im, n_px) for im in images]) if len(images) else np.zeros((0, n_px, n_px, 1), np.uint8)
