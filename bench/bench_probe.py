"""Probe fit benchmark: igpt's torch L-BFGS logistic regression against scikit-learn's
LogisticRegression(solver="lbfgs") on the same standardised features and the same C.

Features: a fixed random linear map of noisy class prototypes (N, d), 10 classes, so the problem is neither
separable nor trivial. Reports seconds per fit (median of 3 fits, alternating ours and sklearn), held-out
accuracy, and both solutions' objective values under the shared objective (nats per example, penalty included).
``sweep``: the probe's C grid (igpt.probe.DEFAULT_CS) on the same features, ours as one batched fit
(igpt.logreg.fit_batch, as `igpt probe` runs it) against one sklearn fit per C; held-out accuracy per C.
Run through bench/run.py (case ``probe_fit``).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from common import Contention, ab_order, others_summary

from igpt.logreg import Standardizer, fit_batch, fit_logreg, objective
from igpt.probe import DEFAULT_CS


def features(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    protos = rng.normal(size=(k, 32))
    z = protos[y] + 1.5 * rng.normal(size=(n, 32))
    X = np.tanh(z @ rng.normal(size=(32, d)) / 4) + 0.3 * rng.normal(size=(n, d))
    return X.astype(np.float32), y


def interleaved(fns: dict, repeats: int) -> dict:
    """Run ``fns['ours']`` and ``fns['reference']`` ``repeats`` times each, alternating which goes first
    (common.ab_order). -> {side: (seconds per run, the last run's result), 'others': others_cores per round}."""
    times: dict = {k: [] for k in fns}
    last: dict = {}
    others = []
    for r in range(repeats):
        with Contention() as c:
            for side in ab_order(r):
                t = time.perf_counter()
                last[side] = fns[side]()
                times[side].append(time.perf_counter() - t)
        others.append(c.others)
    return {**{k: (times[k], last[k]) for k in fns}, "others": others}


def probe_fit_case(quick: bool, n: int = 20000, d: int = 256, C: float = 0.1) -> dict:
    """Seconds per fit, ours against sklearn (median, alternating); ratio = sklearn s / ours s."""
    from sklearn.linear_model import LogisticRegression

    tol = LogisticRegression().tol  # the reference as it comes (1e-4); ours stops at the same max |gradient|
    n, d, repeats = (4000, 64, 1) if quick else (n, d, 3)
    X, y = features(n + n // 4, d, 10)
    s = Standardizer.fit(X[:n])
    Xtr, ytr, Xte, yte = s(X[:n]), y[:n], s(X[n:]), y[n:]
    fit_logreg(Xtr[:500], ytr[:500], C, 10, device="cpu", tol=tol)  # warm-up, untimed: first-call costs on both sides
    LogisticRegression(C=C, solver="lbfgs", max_iter=1000).fit(Xtr[:500], ytr[:500])
    single = interleaved({"ours": lambda: fit_logreg(Xtr, ytr, C, 10, device="cpu", tol=tol),
                          "reference": lambda: LogisticRegression(C=C, solver="lbfgs", max_iter=1000).fit(Xtr, ytr)},
                         repeats)
    grid = interleaved({"ours": lambda: fit_batch(Xtr[None], ytr[None], [list(DEFAULT_CS)], 10, device="cpu", tol=tol),
                        "reference": lambda: [LogisticRegression(C=C, solver="lbfgs", max_iter=1000).fit(Xtr, ytr)
                                              for C in DEFAULT_CS]},
                       repeats)
    (t_ours, ours), (t_ref, ref), others = single["ours"], single["reference"], single["others"]
    (s_ours, batch), (s_ref, refs) = grid["ours"], grid["reference"]
    sweep = {
        "Cs": list(DEFAULT_CS),
        "ours": {"seconds": round(statistics.median(s_ours), 3), "iterations": batch.iterations[0].tolist(),
                 "test_accuracy": [round(float(a), 4) for a in batch.accuracy(Xte[None], yte[None])[0]],
                 "what": "one fit_batch over the grid"},
        "reference": {"seconds": round(statistics.median(s_ref), 3), "iterations": [int(r.n_iter_.max()) for r in refs],
                      "test_accuracy": [round(float(r.score(Xte, yte)), 4) for r in refs],
                      "what": "one sklearn LogisticRegression(lbfgs) fit per C"},
        "ratio": statistics.median(s_ref) / statistics.median(s_ours),
        "others_cores": others_summary(grid["others"]),
    }
    Xt, yt = torch.tensor(Xtr, dtype=torch.float64), torch.tensor(ytr)
    ref_obj = objective(torch.tensor(ref.coef_).double(), torch.tensor(ref.intercept_).double(), Xt, yt, C).item()
    ours_obj = objective(ours.W.double(), ours.b.double(), Xt, yt, C).item()
    return {
        "n_train": n, "d": d, "classes": 10, "C": C, "threads": torch.get_num_threads(),
        "ours": {"seconds": round(statistics.median(t_ours), 3), "iterations": ours.iterations,
                 "test_accuracy": ours.accuracy(Xte, yte), "objective_nats": ours_obj, "dtype": "float32"},
        "reference": {"seconds": round(statistics.median(t_ref), 3), "iterations": int(ref.n_iter_.max()),
                      "test_accuracy": float(ref.score(Xte, yte)), "objective_nats": ref_obj,
                      "what": "sklearn LogisticRegression(lbfgs), float32 in"},
        "ratio": statistics.median(t_ref) / statistics.median(t_ours),
        "others_cores": others_summary(others),
        "sweep": sweep,
    }
