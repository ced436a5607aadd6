"""The probe, its fits and fine-tuning in hard cases (found by a review in the sixteenth session)."""

from __future__ import annotations

import numpy as np
import pytest
from igpt_testutil import tiny_model
from test_probe import write_shards

from igpt.errors import IgptError


def _low_data_problem():
    """3 standardised train images per class of two classes, 12 correlated features (a low-data draw)."""
    from igpt.logreg import Standardizer

    r = np.random.default_rng(0)
    n, d = 200, 12
    y = r.integers(0, 2, n)
    X = (r.normal(size=(n, 4)) @ r.normal(size=(4, d)) * 3 + r.normal(size=(n, d)) * 0.5 + 5).astype(np.float32)
    X[:, :2] += 0.6 * np.eye(2)[y]
    Z = Standardizer.fit(X)(X)
    idx = np.r_[np.flatnonzero(y == 0)[:3], np.flatnonzero(y == 1)[:3]]
    return Z[idx], y[idx], Z, y


# 1 -- L-BFGS dropped every curvature pair once steps were small (absolute s.y > 1e-10), and a dropped pair erased
#      a kept one: at the default grid's C = 1e-3 a 26-parameter fit crawled (bias 0.5e-6 per iteration), stopped at
#      max_iter, intercept 25% off, val predictions unlike sklearn's
def test_small_c_fit_converges_to_sklearns_intercept():
    from sklearn.linear_model import LogisticRegression

    from igpt.logreg import fit_logreg

    Ztr, ytr, Zall, yall = _low_data_problem()
    C = 1e-3
    ours = fit_logreg(Ztr, ytr, C, 2, device="cpu")
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(Ztr.astype(np.float64), ytr)
    b = (ours.b[1] - ours.b[0]).item()
    assert ours.converged and ours.iterations < 200, ours.iterations  # sklearn: a few dozen
    assert abs(b - ref.intercept_[0]) < 1e-3 * abs(ref.intercept_[0]), (b, ref.intercept_[0])
    assert (ours.predict(Zall) == ref.predict(Zall)).all()


def test_batched_low_data_fits_converge():
    """10 classes, 1 image each, 128 features, the default grid: 11 of 15 fits stopped at max_iter 1000 (sklearn
    converges in 25-200 iterations)."""
    import warnings

    from igpt.features import draw_per_class
    from igpt.logreg import ConvergenceWarning, Standardizer, fit_batch

    r = np.random.default_rng(0)
    K, d, n = 10, 128, 2000
    y = r.integers(0, K, n)
    X = (r.normal(size=(n, 8)) @ r.normal(size=(8, d)) * 3 + r.normal(size=(n, d)) * 0.5 + np.eye(K, d)[y] * 0.8
         + 5).astype(np.float32)
    Z = Standardizer.fit(X)(X)
    idx = [draw_per_class(y, 1, s, K) for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_batch(np.stack([Z[i] for i in idx]), np.stack([y[i] for i in idx]), [[1e-3, 1e-2, 0.1, 1, 10]] * 3,
                        K, device="cpu")
    assert fit.converged.all(), fit.iterations


# 2 -- one class: a 1-row softmax (or a train split of one class) gave 100% / chance "results", exit 0
@pytest.mark.parametrize("case", ["one class everywhere", "one class in train"])
def test_probe_refuses_a_single_training_class(tmp_path, case):
    from igpt.checkpoint import save_model
    from igpt.palette import Palette
    from igpt.probe import ProbeConfig, run_probe

    sh = write_shards(tmp_path / "sh", n_classes=1 if case == "one class everywhere" else 2)
    if case == "one class in train":
        np.save(sh / "train_labels.npy", np.zeros(120, np.int64))
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    with pytest.raises(IgptError, match="two classes"):
        run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out"), Cs=(1.0,)))


def test_finetune_refuses_a_single_class(tmp_path):
    from igpt.checkpoint import save_model
    from igpt.finetune import FinetuneConfig, finetune
    from igpt.palette import Palette

    sh = write_shards(tmp_path / "sh", n_classes=1)
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    with pytest.raises(IgptError, match="two classes"):
        finetune(FinetuneConfig(str(ck), str(sh), str(tmp_path / "ft"), steps=2, eval_every=1, batch_size=8))


def _no_features(monkeypatch):
    import igpt.features as F

    def fail(*a, **k):
        raise AssertionError("features were computed before the bad input was refused")

    monkeypatch.setattr(F, "extract_features", fail)


# 3 -- --concat larger than the model: accepted; a huge K looped over range(best - K, best + K + 1) after all the
#      fits (--concat 1000000000000 never ended)
def test_concat_window_past_both_ends_is_refused_before_any_work(tmp_path, monkeypatch):
    from igpt.checkpoint import save_model
    from igpt.palette import Palette
    from igpt.probe import ProbeConfig, run_probe

    sh = write_shards(tmp_path / "sh")
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    _no_features(monkeypatch)
    with pytest.raises(IgptError, match="--concat"):
        run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out"), concat=10**12, Cs=(1.0,)))


# 4 -- OUT/probe.json a folder: found only after every feature and fit (finetune checks this before training)
def test_unwritable_probe_json_is_refused_before_the_features(tmp_path, monkeypatch):
    from igpt.checkpoint import save_model
    from igpt.palette import Palette
    from igpt.probe import ProbeConfig, run_probe

    sh = write_shards(tmp_path / "sh")
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    (tmp_path / "out" / "probe.json").mkdir(parents=True)
    _no_features(monkeypatch)
    with pytest.raises(IgptError, match="probe.json is a folder"):
        run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out"), Cs=(1.0,)))
