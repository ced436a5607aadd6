"""The probe, logistic regression and feature cache in hard cases (found by a review in the fifteenth session)."""

from __future__ import annotations

import io

import numpy as np
import torch
from test_probe import write_shards


def test_float32_fit_does_not_stop_far_from_the_minimum_and_call_it_converged():
    """Nearly collinear features (pooled transformer features are): the float32 fit stopped after ~20
    iterations because the objective, a float32 mean, no longer changed at float32 resolution; it was marked
    converged (no ConvergenceWarning) 6e-4 nats above sklearn's minimum with W 100% off."""
    from sklearn.linear_model import LogisticRegression

    from igpt.logreg import Standardizer, fit_logreg, objective

    rng = np.random.default_rng(0)
    n, d, K, C = 500, 20, 3, 1000.0
    B = rng.normal(size=(n, 5))
    X = B @ rng.normal(size=(5, d)) + 1e-3 * rng.normal(size=(n, d))
    y = (B[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int) + (B[:, 1] > 0.5)
    Z = Standardizer.fit(X)(X)  # float32, as the probe passes it
    ours = fit_logreg(Z, y, C, K, device="cpu")
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(Z.astype(np.float64), y)
    Zt, yt = torch.tensor(Z, dtype=torch.float64), torch.tensor(y)
    f_ref = objective(torch.tensor(ref.coef_), torch.tensor(ref.intercept_), Zt, yt, C).item()
    f_ours = objective(ours.W.double(), ours.b.double(), Zt, yt, C).item()
    assert not ours.converged or f_ours - f_ref < 1e-5, (ours.iterations, f_ours - f_ref)


def test_unconverged_fits_counts_every_fit(tmp_path, monkeypatch):
    """probe.json's unconverged_fits.fits (and the 'N of M fits' warning) summed only the fits of batches
    that had a straggler; batches that all converged were left out of M (the demo printed '28 of 47' for
    48 fits)."""
    from igpt_testutil import tiny_model

    import igpt.probe as P
    from igpt.checkpoint import save_model
    from igpt.logreg import fit_batch
    from igpt.palette import Palette

    sh = write_shards(tmp_path / "sh")
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    fits = []

    def first_batch_capped(X, y, C, *a, **kw):  # the layer sweep stops at 1 iteration, every other fit converges
        fits.append(np.asarray(C).size)
        return fit_batch(X, y, C, *a, **{**kw, "max_iter": 1 if len(fits) == 1 else kw["max_iter"]})

    monkeypatch.setattr(P, "fit_batch", first_batch_capped)
    res = P.run_probe(P.ProbeConfig(str(ck), str(sh), str(tmp_path / "out"), Cs=(0.1, 1.0)))
    stuck = res["unconverged_fits"]
    assert stuck["stopped"] >= 1
    assert stuck["fits"] == sum(fits), (stuck, fits)


def test_low_data_draws_do_not_depend_on_how_the_classes_are_numbered():
    """The same training images whatever order the classes are numbered in: one generator was consumed class
    after class, so a class's draw depended on the classes numbered before it (and on their sizes)."""
    from igpt.features import draw_per_class

    y = np.repeat([0, 1, 2], [30, 50, 40])
    np.random.default_rng(0).shuffle(y)
    renumbered = np.array([2, 0, 1])[y]
    for seed in range(3):
        assert np.array_equal(draw_per_class(y, 5, seed, 3), draw_per_class(renumbered, 5, seed, 3))


def test_cache_key_describes_the_weights_the_features_came_from(tmp_path, monkeypatch):
    """The weights were hashed after they were loaded: weights written to the checkpoint in between (another
    process saving there) gave a cache of the old weights' features under the new weights' key, reused by
    every later run on the new weights."""
    from igpt_testutil import tiny_model

    import igpt.checkpoint as CK
    from igpt.features import extract_features
    from igpt.palette import Palette
    from igpt.probe import ProbeConfig, run_probe
    from igpt.shards import load_shards

    sh = write_shards(tmp_path / "sh")
    pal = Palette.load(sh / "palette.npy")
    ck = CK.save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), pal)
    new = tiny_model(seed=5, n_px=4, palette_size=6)
    real = CK.load_model

    def loaded_then_overwritten(path, device="cpu"):
        out = real(path, device)
        CK.save_model(path, new, pal)  # a writer replaces the weights just after this run read them
        return out

    cfg = ProbeConfig(str(ck), str(sh), str(tmp_path / "out"), layers="0", Cs=(1.0,), cache=True)
    monkeypatch.setattr(CK, "load_model", loaded_then_overwritten)
    run_probe(cfg)
    monkeypatch.setattr(CK, "load_model", real)
    run_probe(cfg)  # the checkpoint holds `new` now
    cached = np.load(tmp_path / "out" / "features" / "train_layer0.npy")
    want = extract_features(new, load_shards(sh).tokens("train"), [0], 64, "cpu")[0]
    assert np.allclose(cached, want, atol=1e-5)


def test_a_foreign_cache_file_is_recomputed_not_a_traceback(tmp_path):
    """np.load dispatches on the file's magic: a layer file that is a zip (an .npz under the .npy name, or a
    damaged one starting with PK) raised AttributeError / BadZipFile instead of being recomputed."""
    from igpt_testutil import tiny_model

    import igpt.features as F
    from igpt.checkpoint import save_model
    from igpt.shards import load_shards

    sh = load_shards(write_shards(tmp_path / "sh"))
    model = tiny_model(n_px=4, palette_size=6)
    ck = save_model(tmp_path / "ck", model, sh.palette)
    cache = tmp_path / "cache"
    cache.mkdir()
    key = F.cache_keys(ck, sh, ["val"])["val"]
    first = F.cached_features(model, sh.tokens("val"), [0], 16, "cpu", cache, key)
    buf = io.BytesIO()
    np.savez(buf, x=first[0])
    for junk in (buf.getvalue(), b"PK\x03\x04 truncated"):
        (cache / "val_layer0.npy").write_bytes(junk)
        again = F.cached_features(model, sh.tokens("val"), [0], 16, "cpu", cache, key)
        assert np.array_equal(again[0], first[0])
