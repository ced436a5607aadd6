"""Palette benchmarks, ours against the references in the same run; prints JSON.

- quantization of 32x32 RGB images: igpt ``Palette.quantize`` against ``transformers``' ImageGPT image
  processor (its Pil variant, resizing off), images/s; ours cold (empty lookup table) and warm;
- palette fitting: ``fit_palette`` (512 colours, 1M pixels) against scikit-learn's MiniBatchKMeans, seconds
  and inertia (sum of squared distances in [-1, 1] units over the same pixels).

Runs alternate ours and the reference (A B A B) and report medians, with the load average before and after.
Usage: python bench/bench_palette.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from igpt.images import convert_channels, decode_image, to_square
from igpt.palette import Palette, fit_palette, to_unit

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


def bench_quantize(images: np.ndarray, palette: Palette, repeats: int, hf_count: int) -> dict:
    from transformers import ImageGPTImageProcessorPil

    proc = ImageGPTImageProcessorPil(clusters=palette.centers, do_resize=False)
    hf_imgs = list(images[:hf_count])
    ours_cold, ours_warm, hf = [], [], []
    for _ in range(repeats):  # A B A B
        fresh = Palette(palette.centers)
        t, ids = timed(lambda p=fresh: p.quantize(images))
        ours_cold.append(len(images) / t)
        t, _ = timed(lambda p=fresh: p.quantize(images))
        ours_warm.append(len(images) / t)
        t, ref = timed(lambda: np.asarray(proc(images=hf_imgs, return_tensors="np")["input_ids"]))
        hf.append(hf_count / t)
    agree = float((ids[:hf_count].reshape(hf_count, -1) == ref).mean())
    med = {k: statistics.median(v) for k, v in (("cold", ours_cold), ("warm", ours_warm), ("hf", hf))}
    return {
        "images": len(images), "hf_images": hf_count, "ids_agree_with_hf": agree,
        "ours_cold_images_per_s": round(med["cold"]), "ours_warm_images_per_s": round(med["warm"]),
        "hf_images_per_s": round(med["hf"], 1),
        "speedup_cold": round(med["cold"] / med["hf"], 1), "speedup_warm": round(med["warm"] / med["hf"], 1),
    }


def bench_fit(pixels: np.ndarray, k: int, repeats: int) -> dict:
    from sklearn.cluster import MiniBatchKMeans

    x = to_unit(pixels)
    ours_t, ours_i, sk_t, sk_i = [], [], [], []
    for r in range(repeats):  # A B A B
        t, fit = timed(lambda r=r: fit_palette(pixels, k, seed=r))
        ours_t.append(t)
        ours_i.append(fit.inertia)
        t, km = timed(lambda r=r: MiniBatchKMeans(k, random_state=r).fit(x))
        sk_t.append(t)
        sk_i.append(float(km.inertia_))
    return {
        "pixels": len(pixels), "k": k, "distinct_colours": fit.n_unique, "ours_iterations": fit.n_iter,
        "ours_s": round(statistics.median(ours_t), 2), "sklearn_minibatch_s": round(statistics.median(sk_t), 2),
        "ours_inertia": round(statistics.median(ours_i), 1), "sklearn_inertia": round(statistics.median(sk_i), 1),
        "time_ratio_sklearn_over_ours": round(statistics.median(sk_t) / statistics.median(ours_t), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and pixels (a smoke run)")
    args = ap.parse_args()
    load0 = os.getloadavg()
    images, what = real_images(32)
    pixels = photo_pixels(200_000 if args.quick else 1_000_000)
    palette = fit_palette(images.reshape(-1, 3), 512, seed=0).palette
    out = {
        "bench": "palette", "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
        "data": what,
        "quantize_32x32_rgb": bench_quantize(images, palette, 2 if args.quick else 3, 200 if args.quick else 400),
        "fit_512": bench_fit(pixels, 512, 1 if args.quick else 2),
    }
    out["loadavg_1m_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
