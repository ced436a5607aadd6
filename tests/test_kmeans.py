"""Palette fitting (igpt.kmeans): seeded and deterministic, finds separated clusters, inertia no worse than
scikit-learn's MiniBatchKMeans, mini-batch mode, re-seeding of empty clusters, and CPU/GPU agreement."""

from __future__ import annotations

import numpy as np
import pytest

from igpt.errors import IgptError
from igpt.kmeans import fit_palette
from igpt.palette import to_unit


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
    with pytest.raises(IgptError, match="1 distinct colour\\(s\\): a palette needs at least 2"):  # no hint of size 1
        fit_palette(np.zeros((40, 3), np.uint8), 16)


def test_seeding_on_a_sample_weighs_each_draw_once(rng, monkeypatch):
    """Above the sample size, k-means++ seeds on colours drawn in proportion to their counts; each colour must
    then weigh as often as it was drawn (the sample's weights sum to the draws), not its count again, which
    counted the counts twice (4-13% worse inertia on photos, twice the Lloyd passes)."""
    import igpt.kmeans as km

    seen = []
    real = km._kmeans_pp
    monkeypatch.setattr(km, "_PP_SAMPLE", 200)
    monkeypatch.setattr(km, "_kmeans_pp", lambda x, w, k, g: seen.append(w.clone()) or real(x, w, k, g))
    px = rng.integers(0, 256, (5000, 3), dtype=np.uint8)
    px[:2000] = px[0]  # one colour holds 40% of the pixels
    fit_palette(px, 8, seed=0, device="cpu")
    (w,) = seen
    assert float(w.sum()) == 200 and float(w.max()) > 50  # the frequent colour drawn ~80 times, weighing that


@pytest.mark.gpu
def test_fit_on_cuda_matches_cpu_quality(rng):
    px = np.concatenate([clustered_pixels(rng, k=16, spread=20), rng.integers(0, 256, (20000, 3), dtype=np.uint8)])
    cpu = fit_palette(px, 64, seed=0, device="cpu")
    gpu = fit_palette(px, 64, seed=0, device="cuda")
    assert gpu.palette.centers.shape == (64, 3) and gpu.n_unique == cpu.n_unique
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=0.02)  # same algorithm; float sums differ in order
    again = fit_palette(px, 64, seed=0, device="cuda")
    assert again.inertia == pytest.approx(gpu.inertia, rel=1e-3)
