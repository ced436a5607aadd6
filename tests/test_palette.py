"""Palettes: fitting, quantize/dequantize, file formats, and parity with the transformers ImageGPT processor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from igpt.errors import IgptError
from igpt.images import convert_channels, decode_image, to_square
from igpt.palette import Palette, fit_palette, nearest, to_unit


def clustered_pixels(rng, k=8, n=20000, spread=6):
    centres = rng.integers(30, 226, (k, 3))
    pick = rng.integers(0, k, n)
    return np.clip(centres[pick] + rng.integers(-spread, spread + 1, (n, 3)), 0, 255).astype(np.uint8)


def test_fit_is_seeded_and_deterministic(rng):
    px = clustered_pixels(rng)
    a, b = fit_palette(px, 8, seed=3), fit_palette(px, 8, seed=3)
    assert np.array_equal(a.palette.centers, b.palette.centers) and a.inertia == b.inertia
    c = fit_palette(px, 8, seed=4)
    assert not np.array_equal(a.palette.centers, c.palette.centers)


def test_fit_finds_separated_clusters(rng):
    px = clustered_pixels(rng, k=8, spread=3)
    fit = fit_palette(px, 8, seed=0)
    ids = fit.palette.quantize(px)
    assert len(np.unique(ids)) == 8  # every cluster used
    got = np.sort(fit.palette.colours().astype(int), axis=0)
    true = np.sort(np.array([px[ids == i].mean(0) for i in range(8)]), axis=0)
    assert np.abs(got - true).max() <= 1


def test_fit_inertia_no_worse_than_sklearn(rng):
    from sklearn.cluster import MiniBatchKMeans

    px = rng.integers(0, 256, (10000, 3), dtype=np.uint8)
    ours = fit_palette(px, 32, seed=0)
    sk = MiniBatchKMeans(32, random_state=0, n_init=1).fit(to_unit(px))
    assert ours.inertia <= sk.inertia_ * 1.0001
    # the reported inertia is the real one
    d = ((to_unit(px) - ours.palette.centers[ours.palette.quantize(px)].astype(np.float64)) ** 2).sum()
    assert ours.inertia == pytest.approx(d, rel=1e-4)


def test_fit_minibatch_mode(rng):
    px = clustered_pixels(rng, k=6, spread=2)
    full = fit_palette(px, 6, seed=0)
    mini = fit_palette(px, 6, seed=0, batch_size=256, max_iter=200)
    assert mini.inertia <= full.inertia * 1.5
    assert np.array_equal(mini.palette.centers, fit_palette(px, 6, seed=0, batch_size=256, max_iter=200).palette.centers)


def test_grey_palette_any_k(rng):
    px = rng.integers(0, 256, (5000, 1), dtype=np.uint8)
    fit = fit_palette(px, 16, seed=0)
    assert fit.palette.centers.shape == (16, 1) and fit.palette.channels == 1
    assert np.all(np.diff(np.sort(fit.palette.centers[:, 0])) > 0)


def test_dead_clusters_reseeded(rng):
    # 40 distinct colours, 30 of them in one tight blob: k-means++ plus Lloyd must still use all 10 centres
    blob = np.full((3000, 3), 128, np.uint8) + rng.integers(0, 3, (3000, 3)).astype(np.uint8)
    far = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8).repeat(2, 0)
    fit = fit_palette(np.concatenate([blob, far]), 10, seed=0)
    assert len(np.unique(fit.palette.quantize(np.concatenate([blob, far])))) == 10


def test_fewer_colours_than_k_is_an_error():
    px = np.array([[0], [10], [20]], np.uint8).repeat(5, 0)
    with pytest.raises(IgptError, match="only 3 distinct colours.*palette size 16"):
        fit_palette(px, 16)


def test_quantize_dequantize_round_trip(rng):
    pal = Palette(rng.uniform(-1, 1, (64, 3)).astype(np.float32))
    colours = pal.colours()
    ids = pal.quantize(colours)
    # each palette colour maps back to itself unless two centres round to the same uint8 colour
    assert np.array_equal(pal.dequantize(ids), colours)
    assert np.array_equal(pal.colours(), np.rint(127.5 * (pal.centers.astype(np.float64) + 1)).astype(np.uint8))
    img = rng.integers(0, 256, (4, 9, 9, 3), dtype=np.uint8)
    q = pal.quantize(img)
    assert q.shape == (4, 9, 9) and q.dtype == np.uint16
    assert np.array_equal(q.ravel(), nearest(to_unit(img.reshape(-1, 3)), pal.centers))
    assert np.array_equal(pal.quantize(img), q)  # warm lookup table gives the same answer
    brute = ((to_unit(img.reshape(-1, 3))[:, None] - pal.centers[None].astype(np.float64)) ** 2).sum(-1)
    d_best = brute.min(1)
    assert np.allclose(brute[np.arange(len(brute)), q.ravel()], d_best, atol=1e-12)


def test_quantize_errors(rng):
    pal = Palette(rng.uniform(-1, 1, (8, 3)))
    with pytest.raises(IgptError, match="RGB.*grey"):
        pal.quantize(np.zeros((2, 2, 1), np.uint8))
    with pytest.raises(IgptError, match="uint8"):
        pal.quantize(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(IgptError, match="out of range"):
        pal.dequantize(np.array([8]))
    with pytest.raises(IgptError, match="within"):
        Palette(np.full((4, 3), 2.0))
    with pytest.raises(IgptError, match="shape"):
        Palette(np.zeros((4, 2)))


def test_openai_layout_loads_unchanged(tmp_path, rng):
    centers = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", centers)  # OpenAI's file: (512, 3) float32, no sidecar
    pal = Palette.load(tmp_path / "kmeans_centers.npy")
    assert pal.centers.dtype == np.float32 and np.array_equal(pal.centers, centers)
    assert np.array_equal(Palette.load(tmp_path).centers, centers)  # a folder holding it


def test_save_load_and_sidecar(tmp_path, rng):
    pal = Palette(rng.uniform(-1, 1, (16, 1)).astype(np.float32))
    pal.save(tmp_path / "palette.npy")
    side = json.loads((tmp_path / "palette.json").read_text())
    assert side["k"] == 16 and side["channels"] == 1 and side["sha256"] == pal.hash
    back = Palette.load(tmp_path / "palette.npy")
    assert np.array_equal(back.centers, pal.centers) and back.hash == pal.hash
    np.save(tmp_path / "palette.npy", pal.centers * 0.5)  # changed behind the sidecar's back
    with pytest.raises(IgptError, match="does not match its sidecar"):
        Palette.load(tmp_path / "palette.npy")
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(IgptError, match="obj.npy"):
        Palette.load(tmp_path / "obj.npy")


def test_hf_preprocessor_config_palette(tmp_path, rng):
    from transformers import ImageGPTImageProcessorPil

    clusters = rng.uniform(-1, 1, (32, 3))
    ImageGPTImageProcessorPil(clusters=clusters).save_pretrained(tmp_path)
    pal = Palette.load(tmp_path / "preprocessor_config.json")
    assert np.allclose(pal.centers, clusters, atol=1e-7)
    (tmp_path / "bad.json").write_text(json.dumps({"do_resize": True}))
    with pytest.raises(IgptError, match="no 'clusters'"):
        Palette.load(tmp_path / "bad.json")


def hf_ids(images: list[np.ndarray], clusters: np.ndarray) -> np.ndarray:
    from transformers import ImageGPTImageProcessorPil

    proc = ImageGPTImageProcessorPil(clusters=clusters, do_resize=False)
    return np.asarray(proc(images=images, return_tensors="np")["input_ids"])


def assert_parity_except_ties(images, pal):
    ours = pal.quantize(np.stack(images)).reshape(len(images), -1)
    ref = hf_ids(images, pal.centers)
    diff = ours != ref
    if diff.any():  # only exact or floating-point ties may disagree
        px = to_unit(np.stack(images).reshape(len(images), -1, 3)[diff])
        c = pal.centers.astype(np.float64)
        d_ours = ((px - c[ours[diff]]) ** 2).sum(-1)
        d_ref = ((px - c[ref[diff]]) ** 2).sum(-1)
        assert np.allclose(d_ours, d_ref, rtol=0, atol=1e-6), "a non-tie disagreement with transformers"
    return diff.mean()


@pytest.mark.shared_data
def test_parity_with_transformers_on_real_images(shared_data):
    files = sorted((shared_data / "samples").glob("*/*"))
    emoji = sorted((shared_data / "emoji").glob("*/*.png"))[::20]
    images = [to_square(convert_channels(decode_image(f), 3), 32) for f in files + emoji]
    rng = np.random.default_rng(0)
    pal = fit_palette(np.concatenate([im.reshape(-1, 3) for im in images]), 512, seed=0, max_iter=10).palette
    assert assert_parity_except_ties(images, pal) < 1e-3
    random_pal = Palette(rng.uniform(-1, 1, (512, 3)))  # float64, like the processor's JSON clusters
    assert assert_parity_except_ties(images, random_pal) < 1e-3


def test_parity_with_transformers_synthetic(rng):
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
    images.append(np.asarray(Image.new("RGB", (16, 16), (12, 200, 99))))
    pal = Palette(rng.uniform(-1, 1, (64, 3)).astype(np.float32))
    assert assert_parity_except_ties(images, pal) == 0


@pytest.mark.gpu
def test_fit_on_cuda_matches_cpu_quality(rng):
    px = np.concatenate([clustered_pixels(rng, k=16, spread=20), rng.integers(0, 256, (20000, 3), dtype=np.uint8)])
    cpu = fit_palette(px, 64, seed=0, device="cpu")
    gpu = fit_palette(px, 64, seed=0, device="cuda")
    assert gpu.palette.centers.shape == (64, 3) and gpu.n_unique == cpu.n_unique
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=0.02)  # same algorithm; float sums differ in order
    again = fit_palette(px, 64, seed=0, device="cuda")
    assert again.inertia == pytest.approx(gpu.inertia, rel=1e-3)
