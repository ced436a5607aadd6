"""Torch L-BFGS logistic regression against scikit-learn's LogisticRegression(solver='lbfgs')."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igpt.errors import IgptError
from igpt.logreg import Standardizer, fit_logreg, loss_and_grads, objective, sweep


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


def test_closed_form_gradients_equal_autograd_of_the_objective():
    X, y = blobs(n=300, d=7, k=5, seed=2)
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 3).requires_grad_(True)  # large logits: stability
    b = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(True)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    ref = objective(W, b, Xt, yt, 0.7)
    ref.backward()
    Y = torch.nn.functional.one_hot(yt, 5).T.to(torch.float64)
    loss, dW, db = loss_and_grads(W.detach(), b.detach(), Xt.T, yt, Y, 0.7)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(dW, W.grad, rtol=1e-10, atol=1e-12) and torch.allclose(db, b.grad, rtol=1e-10, atol=1e-12)


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


def test_standardizer_uses_fit_statistics_and_constant_columns():
    X = np.array([[1.0, 5.0], [3.0, 5.0]])
    s = Standardizer.fit(X)
    assert np.allclose(s(X), [[-1, 0], [1, 0]])
    assert np.allclose(s(np.array([[5.0, 6.0]])), [[3, 1]])


def test_sweep_prefers_smaller_C_on_ties_and_keeps_order():
    X, y = blobs(n=200, d=4, k=2, noise=0.01)
    Z = Standardizer.fit(X)(X)
    accs, C = sweep(Z, y, Z, y, [10.0, 1.0, 100.0], 2)
    assert len(accs) == 3
    best = max(accs)
    assert C == min(c for c, a in zip([10.0, 1.0, 100.0], accs) if a == best)


def test_bad_inputs_are_user_errors():
    with pytest.raises(IgptError, match="C must be > 0"):
        fit_logreg(np.zeros((2, 2)), np.zeros(2), 0.0)
    with pytest.raises(IgptError, match="need X"):
        fit_logreg(np.zeros((2, 2)), np.zeros(3), 1.0)


@pytest.mark.gpu
def test_cuda_fit_matches_cpu_fit():
    X, y = blobs(n=2000, d=40, k=6, seed=5)
    Z = Standardizer.fit(X)(X)
    cpu = fit_logreg(Z, y, 0.3, 6, dtype=torch.float64, tol=1e-9, device="cpu")
    gpu = fit_logreg(Z, y, 0.3, 6, dtype=torch.float64, tol=1e-9, device="cuda")
    assert gpu.W.device.type == "cuda"
    assert np.abs(gpu.W.cpu().numpy() - cpu.W.numpy()).max() < 1e-5
    assert gpu.accuracy(Z, y) == cpu.accuracy(Z, y)
