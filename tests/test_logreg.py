"""Torch L-BFGS logistic regression against scikit-learn's LogisticRegression(solver='lbfgs')."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from igpt.errors import IgptError
from igpt.logreg import (
    ConvergenceWarning,
    Standardizer,
    _Problems,
    best_index,
    fit_batch,
    fit_logreg,
    objective,
)


def blobs(n=600, d=12, k=4, noise=2.0, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    W = rng.normal(size=(k, d))
    y = (X @ W.T + noise * rng.gumbel(size=(n, k))).argmax(1)
    return X, y


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_agrees_with_sklearn(C):
    from sklearn.linear_model import LogisticRegression

    X, y = blobs()
    Z = Standardizer.fit(X)(X).astype(np.float64)
    ours = fit_logreg(Z, y, C, 4, dtype=torch.float64, tol=1e-9, device="cpu")
    ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=10_000).fit(Z, y)
    assert abs(ours.accuracy(Z, y) - ref.score(Z, y)) <= 0.005
    assert np.abs(ours.W.numpy() - ref.coef_).max() < 1e-4
    # the same objective, at its minimum: sklearn's solution scores no lower under our (scaled) objective
    theirs = objective(torch.tensor(ref.coef_), torch.tensor(ref.intercept_), torch.tensor(Z), torch.tensor(y), C)
    assert ours.loss == pytest.approx(theirs.item(), rel=1e-7, abs=1e-9)
    # softmax is shift-invariant in the bias; compare centred biases
    b = ours.b.numpy()
    assert np.abs((b - b.mean()) - (ref.intercept_ - ref.intercept_.mean())).max() < 1e-4


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_two_classes_agree_with_sklearns_binary_model(C):
    """sklearn fits one weight vector for two classes; ours keeps two softmax rows, whose difference must be
    sklearn's coef_ at the same C (not at 2 C, which an unscaled penalty on two rows would give)."""
    from sklearn.linear_model import LogisticRegression

    X, y = blobs(n=300, d=5, k=2, noise=1.5, seed=3)
    Z = Standardizer.fit(X)(X).astype(np.float64)
    ours = fit_logreg(Z, y, C, 2, dtype=torch.float64, tol=1e-10, device="cpu")
    ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=10_000).fit(Z, y)
    assert np.abs((ours.W[1] - ours.W[0]).numpy() - ref.coef_[0]).max() < 1e-5
    assert abs((ours.b[1] - ours.b[0]).item() - ref.intercept_[0]) < 1e-5
    theirs = torch.tensor(np.stack([-ref.coef_[0], ref.coef_[0]]) / 2)
    bias = torch.tensor([-ref.intercept_[0], ref.intercept_[0]]) / 2
    assert ours.loss == pytest.approx(objective(theirs, bias, torch.tensor(Z), torch.tensor(y), C).item(), rel=1e-7)


def test_closed_form_gradients_equal_autograd_of_the_objective():
    X, y = blobs(n=300, d=7, k=5, seed=2)
    g = torch.Generator().manual_seed(0)
    Cs = [0.7, 3.0]
    T = torch.randn(2, 5, 8, generator=g, dtype=torch.float64) * 3  # large logits: stability
    Xt, yt = torch.tensor(X), torch.tensor(y)
    pr = _Problems(Xt[None], yt[None], torch.tensor([Cs], dtype=torch.float64), 5)
    loss, cache = pr.trial(pr.logits(T), T)
    grad = pr.grad(T, cache)
    for p, C in enumerate(Cs):
        W, b = T[p, :, :-1].clone().requires_grad_(True), T[p, :, -1].clone().requires_grad_(True)
        ref = objective(W, b, Xt, yt, C)
        ref.backward()
        assert loss[p].item() == pytest.approx(ref.item(), rel=1e-12)
        assert torch.allclose(grad[p, :, :-1], W.grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(grad[p, :, -1], b.grad, rtol=1e-10, atol=1e-12)


def test_batched_fits_equal_separate_fits_and_sklearn():
    """Two data sets x three C values in one batch: each problem is fitted to its own minimiser (sklearn's),
    whatever else is in the batch, and problems that converge early leave it with their own iteration count."""
    from sklearn.linear_model import LogisticRegression

    data = [blobs(n=400, d=9, k=3, seed=s) for s in (7, 8)]
    Z = np.stack([Standardizer.fit(X)(X) for X, _ in data]).astype(np.float64)
    y = np.stack([y for _, y in data])
    Cs = [[1e-2, 1.0, 30.0], [0.1, 1.0, 5.0]]
    fit = fit_batch(Z, y, Cs, 3, dtype=torch.float64, tol=1e-9, device="cpu")
    assert fit.W.shape == (2, 3, 3, 9) and fit.b.shape == (2, 3, 3) and fit.iterations.shape == (2, 3)
    assert len(set(fit.iterations.ravel().tolist())) > 1  # stopped at different iterations
    acc = fit.accuracy(Z, y)
    for g in range(2):
        for p, C in enumerate(Cs[g]):
            ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=10_000).fit(Z[g], y[g])
            assert np.abs(fit.W[g, p].numpy() - ref.coef_).max() < 1e-4
            assert acc[g, p] == pytest.approx(ref.score(Z[g], y[g]), abs=0.005)
            alone = fit_logreg(Z[g], y[g], C, 3, dtype=torch.float64, tol=1e-9, device="cpu")
            assert fit.loss[g, p] == pytest.approx(alone.loss, rel=1e-9)


def test_float32_default_matches_sklearn_accuracy():
    from sklearn.linear_model import LogisticRegression

    X, y = blobs(n=1000, d=30, k=5, seed=3)
    s = Standardizer.fit(X[:800])
    ours = fit_logreg(s(X[:800]), y[:800], 0.5, 5)
    ref = LogisticRegression(C=0.5, solver="lbfgs", max_iter=5000).fit(s(X[:800]), y[:800])
    assert abs(ours.accuracy(s(X[800:]), y[800:]) - ref.score(s(X[800:]), y[800:])) <= 0.005


def test_objective_is_sklearns_over_C_n():
    X, y = blobs(n=50, d=3, k=3)
    W, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    C = 0.37
    sk = C * torch.nn.functional.cross_entropy(Xt @ W.T + b, yt, reduction="sum") + 0.5 * W.pow(2).sum()
    assert objective(W, b, Xt, yt, C).item() == pytest.approx(sk.item() / (C * 50), rel=1e-12)


def test_separable_data_is_fitted_exactly():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    X = rng.normal(size=(120, 5)) * 0.1
    X[np.arange(120), y] += 3.0  # class c lives along axis c
    m = fit_logreg(Standardizer.fit(X)(X), y, 1.0, 3)
    assert m.accuracy(Standardizer.fit(X)(X), y) == 1.0


def test_fits_stopped_by_max_iter_are_marked_and_warned():
    """A fit that max_iter stopped was reported like a converged one (sklearn warns: ConvergenceWarning)."""
    X, y = blobs(n=300, d=20, k=4, seed=5)
    Z = Standardizer.fit(X)(X)
    with pytest.warns(ConvergenceWarning, match=r"1 of 2 fits stopped at max_iter=15 .*C = 100\)"):
        fits = fit_batch(Z[None], y[None], [[0.1, 100.0]], 4, max_iter=15, device="cpu")
    assert fits.converged.tolist() == [[True, False]]  # 13 and 22 iterations with max_iter 1000
    assert fits.iterations[0, 1] == 15
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # enough iterations: no warning
        m = fit_logreg(Z, y, 100.0, 4, device="cpu")
    assert m.converged and m.iterations < 1000


def test_standardizer_uses_fit_statistics_and_constant_columns():
    X = np.array([[1.0, 5.0], [3.0, 5.0]])
    s = Standardizer.fit(X)
    assert np.allclose(s(X), [[-1, 0], [1, 0]])
    assert np.allclose(s(np.array([[5.0, 6.0]])), [[3, 1]])


def test_best_index_prefers_the_smaller_C_on_ties():
    assert best_index([0.9, 0.95, 0.95], [10.0, 1.0, 100.0]) == 1
    assert best_index([0.95, 0.9, 0.95], [0.1, 1.0, 0.01]) == 2
    X, y = blobs(n=200, d=4, k=2, noise=0.01)
    Z = Standardizer.fit(X)(X)
    Cs = [10.0, 1.0, 100.0]
    accs = fit_batch(Z[None], y[None], [Cs], 2).accuracy(Z[None], y[None])[0]
    best = max(accs)
    assert Cs[best_index(accs, Cs)] == min(c for c, a in zip(Cs, accs) if a == best)


def test_bad_inputs_are_user_errors():
    with pytest.raises(IgptError, match="C must be > 0"):
        fit_logreg(np.zeros((2, 2)), np.zeros(2), 0.0)
    with pytest.raises(IgptError, match="need X"):
        fit_logreg(np.zeros((2, 2)), np.zeros(3), 1.0)
    with pytest.raises(IgptError, match="one row per data set"):
        fit_batch(np.zeros((2, 3, 2)), np.zeros((2, 3)), [[1.0]])
    with pytest.raises(IgptError, match="labels must lie"):
        fit_batch(np.zeros((1, 3, 2)), np.array([[0, 1, 2]]), [[1.0]], 2)


@pytest.mark.gpu
def test_cuda_fit_matches_cpu_fit():
    X, y = blobs(n=2000, d=40, k=6, seed=5)
    Z = Standardizer.fit(X)(X)
    cpu = fit_logreg(Z, y, 0.3, 6, dtype=torch.float64, tol=1e-9, device="cpu")
    gpu = fit_logreg(Z, y, 0.3, 6, dtype=torch.float64, tol=1e-9, device="cuda")
    assert gpu.W.device.type == "cuda"
    assert np.abs(gpu.W.cpu().numpy() - cpu.W.numpy()).max() < 1e-5
    assert gpu.accuracy(Z, y) == cpu.accuracy(Z, y)


def test_fits_predict_applies_each_model_to_its_own_data_set():
    """Fits.predict (every C in one product) against each fitted model applied on its own; X shared or per set."""
    from igpt.logreg import Fits

    g = torch.Generator().manual_seed(0)
    G, P, K, d, m = 3, 4, 5, 7, 20
    fits = Fits(torch.randn(G, P, K, d, generator=g), torch.randn(G, P, K, generator=g), np.zeros((G, P)),
                np.zeros((G, P)))
    for X in (torch.randn(G, m, d, generator=g), torch.randn(1, m, d, generator=g)):
        want = np.array([[(X[min(i, len(X) - 1)] @ fits.W[i, p].T + fits.b[i, p]).argmax(-1).numpy() for p in range(P)]
                         for i in range(G)])
        assert np.array_equal(fits.predict(X.numpy()), want)
