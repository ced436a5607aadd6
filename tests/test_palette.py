"""Palettes: quantize/dequantize, file formats, and parity with the transformers ImageGPT processor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from igpt.errors import IgptError
from igpt.images import convert_channels, decode_image, to_square
from igpt.kmeans import fit_palette
from igpt.palette import CELL, Palette, cell_candidates, nearest, nearest_rgb, pack_rgb, to_unit


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


@pytest.mark.parametrize("k, seed", [(2, 0), (16, 1), (512, 2)])
def test_cell_search_equals_the_full_search(k, seed):
    """nearest_rgb (each colour against its cell's candidate centres only) gives the ids of the search over all
    centres: random colours, every colour along the cube's edges and cell borders, and a palette with repeated
    centres (exact ties go to the lowest id)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-1, 1, (k, 3))
    if k >= 16:
        centres[:4] = [[-1, -1, -1], [1, 1, 1], [-1, 1, -1], [0.0, 0.0, 0.0]]
        centres[k // 2] = centres[3]  # an exact duplicate: the lower id must win everywhere
    v = np.r_[0, CELL - 1, CELL, CELL + 1, 127, 128, 255]  # cell borders and the cube's faces
    grid = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
    rgb = np.concatenate([rng.integers(0, 256, (50_000, 3)), grid]).astype(np.uint8)
    codes = pack_rgb(rgb)
    want = nearest(to_unit(rgb), centres)
    assert np.array_equal(nearest_rgb(codes, centres, cell_candidates(centres)), want)
    if k >= 16:
        assert (want != k // 2).all()
    pal = Palette(centres.astype(np.float32))
    assert np.array_equal(pal.quantize(rgb[None]), nearest(to_unit(rgb), pal.centers)[None])


def test_a_fresh_table_and_a_partly_filled_one_give_the_same_ids(rng):
    """A fresh RGB table solves every distinct colour and gathers once (no lookups to try first); a table
    that has seen some colours looks up first and solves the rest. Same ids either way, empty input included."""
    centres = rng.uniform(-1, 1, (64, 3)).astype(np.float32)
    imgs = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    want = np.stack([nearest(to_unit(im.reshape(-1, 3)), centres) for im in imgs]).reshape(50, 8, 8)
    fresh = Palette(centres)
    assert fresh.quantize(imgs[:0]).shape == (0, 8, 8)  # nothing to solve: the table stays fresh
    assert np.array_equal(fresh.quantize(imgs), want)
    partly = Palette(centres)
    partly.quantize(imgs[:7])
    assert np.array_equal(partly.quantize(imgs), want) and np.array_equal(partly.quantize(imgs[::-1]), want[::-1])


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
    (tmp_path / "palette.json").write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError traceback
    with pytest.raises(IgptError, match="palette sidecar is not valid JSON"):
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
    # float32 clusters (OpenAI's, ours exported) load as the same palette, hash included, as from a .npy: the
    # JSON's float64 gave another hash, so shards prepared with it were refused for the imported model
    c32 = clusters.astype(np.float32)
    ImageGPTImageProcessorPil(clusters=c32).save_pretrained(tmp_path / "f32")
    np.save(tmp_path / "c32.npy", c32)
    assert Palette.load(tmp_path / "f32" / "preprocessor_config.json").hash == Palette.load(tmp_path / "c32.npy").hash
    assert pal.centers.dtype == np.float64  # float64 values that float32 would round stay float64
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
