"""Palette benchmarks, ours against the references in the same run (cases for bench/run.py).

- quantization of 32x32 RGB images: igpt ``Palette.quantize`` against ``transformers``' ImageGPT image
  processor (its Pil variant, resizing off), images/s; ours from a fresh palette (empty lookup table), and
  on unseen images with the table filled by others;
- palette fitting: ``fit_palette`` (512 colours, 1M pixels) against scikit-learn's MiniBatchKMeans, seconds
  and inertia (sum of squared distances in [-1, 1] units over the same pixels).

Runs alternate ours and the reference (A B, then B A) and report medians, with the CPU time other processes
took.
Cases ``quantize`` and ``palette_fit``; --quick uses 200 reference images and 200k pixels.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from common import Contention, ab_order, others_summary

from igpt.images import convert_channels, decode_image, to_square
from igpt.kmeans import fit_palette
from igpt.palette import Palette, to_unit

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_images(n_px: int = 32) -> tuple[np.ndarray, str]:
    """Real colour images at n_px (emoji and CIFAR/ImageNet samples) when ../shared/data exists."""
    files = sorted(SHARED.glob("emoji/*/*.png")) + sorted(SHARED.glob("samples/*/*"))
    if files:
        imgs = [to_square(convert_channels(decode_image(f), 3), n_px) for f in files]
        return np.stack(imgs), f"{len(files)} real images from ../shared/data (emoji, CIFAR, ImageNet)"
    rng = np.random.default_rng(0)  # smooth random colour fields, so colours repeat as in real images
    base = rng.integers(0, 256, (2000, 4, 4, 3), dtype=np.uint8)
    imgs = np.stack([to_square(b, n_px) for b in base])
    return imgs, "2000 synthetic smooth colour images (../shared/data absent)"


def photo_pixels(n: int) -> np.ndarray:
    files = sorted(SHARED.glob("samples/imagenet/*.jpg"))
    if files:
        px = np.concatenate([decode_image(f).reshape(-1, 3) for f in files])
    else:
        px = real_images(64)[0].reshape(-1, 3)
    rng = np.random.default_rng(0)
    return px[rng.choice(len(px), size=min(n, len(px)), replace=False)]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def quantize_case(quick: bool) -> dict:
    """igpt Palette.quantize against the HF image processor on the same images, images/s. ratio = ours cold /
    reference: a fresh palette (empty lookup table) quantizing every image once, as `igpt prepare` meets a data
    set. Also ``ratio_warm_unseen``: the table filled by the first half of the images, the second half timed
    (colours repeat across real images, so a long run approaches it); never the same images twice. Both sides
    quantize the same images (until the thirteenth session the reference timed the first 400 only, while ours
    timed all of them, and ours' rate grows with the images a table has seen: the same work is the fair test)."""
    from transformers import ImageGPTImageProcessorPil

    images, what = real_images(32)
    palette = fit_palette(images.reshape(-1, 3), 512, seed=0).palette
    repeats = 2 if quick else 3
    images = images[:200] if quick else images
    proc = ImageGPTImageProcessorPil(clusters=palette.centers, do_resize=False)
    hf_imgs, hf_count = list(images), len(images)
    half = len(images) // 2
    times = {"cold": [], "warm_unseen": [], "hf": []}
    others = []
    ids = ref = None
    Palette(palette.centers).quantize(images[:16])  # warm-up, untimed: first-call costs on both sides
    proc(images=hf_imgs[:16], return_tensors="np")
    for r in range(repeats):
        with Contention() as c:
            for side in ab_order(r):  # A B, then B A
                if side == "ours":
                    t, ids = timed(lambda: Palette(palette.centers).quantize(images))
                    times["cold"].append(len(images) / t)
                    fresh = Palette(palette.centers)
                    fresh.quantize(images[:half])
                    t, _ = timed(lambda p=fresh: p.quantize(images[half:]))
                    times["warm_unseen"].append((len(images) - half) / t)
                else:
                    t, ref = timed(lambda: np.asarray(proc(images=hf_imgs, return_tensors="np")["input_ids"]))
                    times["hf"].append(hf_count / t)
        others.append(c.others)
    agree = float((ids[:hf_count].reshape(hf_count, -1) == ref).mean())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "data": what, "images": len(images), "reference_images": hf_count, "ids_agree_with_reference": agree,
        "ours": {"images_s": round(med["cold"]), "warm_unseen_images_s": round(med["warm_unseen"]),
                 "what": "a fresh Palette.quantize over every image once (empty lookup table)"},
        "reference": {"images_s": round(med["hf"], 1), "what": "transformers ImageGPTImageProcessorPil"},
        "ratio": med["cold"] / med["hf"], "ratio_warm_unseen": med["warm_unseen"] / med["hf"],
        "others_cores": others_summary(others),
    }


def palette_fit_case(quick: bool, k: int = 512) -> dict:
    """fit_palette against scikit-learn's MiniBatchKMeans on the same pixels; ratio = reference s / ours s,
    and both inertias (sum of squared distances in [-1, 1] units over the same pixels; lower is better)."""
    from sklearn.cluster import MiniBatchKMeans

    pixels = photo_pixels(200_000 if quick else 1_000_000)
    x = to_unit(pixels)
    ours_t, ours_i, sk_t, sk_i, others = [], [], [], [], []
    for r in range(1 if quick else 2):
        with Contention() as c:
            for side in ab_order(r):  # A B, then B A (ours ran first in every round until the thirteenth session)
                if side == "ours":
                    t, fit = timed(lambda r=r: fit_palette(pixels, k, seed=r, device="cpu"))
                    ours_t.append(t)
                    ours_i.append(fit.inertia)
                else:
                    t, km = timed(lambda r=r: MiniBatchKMeans(k, random_state=r).fit(x))
                    sk_t.append(t)
                    sk_i.append(float(km.inertia_))
        others.append(c.others)
    return {
        "pixels": len(pixels), "k": k, "distinct_colours": fit.n_unique,
        "ours": {"seconds": round(statistics.median(ours_t), 2), "inertia": round(statistics.median(ours_i), 1),
                 "iterations": fit.n_iter},
        "reference": {"seconds": round(statistics.median(sk_t), 2), "inertia": round(statistics.median(sk_i), 1),
                      "what": "sklearn MiniBatchKMeans(512)"},
        "ratio": statistics.median(sk_t) / statistics.median(ours_t),  # unrounded: the targets are judged on it
        "inertia_ratio": statistics.median(ours_i) / statistics.median(sk_i),
        "others_cores": others_summary(others),
    }
