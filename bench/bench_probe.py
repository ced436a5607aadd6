"""Probe fit benchmark: igpt's torch L-BFGS logistic regression against scikit-learn's
LogisticRegression(solver="lbfgs") on the same standardised features and the same C; prints JSON.

Features: a fixed random linear map of noisy class prototypes (N, d), 10 classes, so the problem is neither
separable nor trivial. Reports seconds per fit (median of --repeats, alternating ours and sklearn), held-out
accuracy, and both solutions' objective values under the shared objective (nats per example, penalty included).
Usage: python bench/bench_probe.py [--n 20000 --d 256 --C 0.1 --repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from igpt.logreg import Standardizer, fit_logreg, objective


def features(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    protos = rng.normal(size=(k, 32))
    z = protos[y] + 1.5 * rng.normal(size=(n, 32))
    X = np.tanh(z @ rng.normal(size=(32, d)) / 4) + 0.3 * rng.normal(size=(n, d))
    return X.astype(np.float32), y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--C", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="n 4000, d 64, 1 repeat")
    a = ap.parse_args()
    if a.quick:
        a.n, a.d, a.repeats = 4000, 64, 1
    from sklearn.linear_model import LogisticRegression

    X, y = features(a.n + a.n // 4, a.d, 10)
    s = Standardizer.fit(X[: a.n])
    Xtr, ytr, Xte, yte = s(X[: a.n]), y[: a.n], s(X[a.n :]), y[a.n :]
    load0 = os.getloadavg()[0]
    t_ours, t_ref = [], []
    for _ in range(a.repeats):
        t = time.perf_counter()
        ours = fit_logreg(Xtr, ytr, a.C, 10, device="cpu")
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = LogisticRegression(C=a.C, solver="lbfgs", max_iter=1000).fit(Xtr, ytr)
        t_ref.append(time.perf_counter() - t)
    Xt, yt = torch.tensor(Xtr, dtype=torch.float64), torch.tensor(ytr)
    ref_obj = objective(torch.tensor(ref.coef_).double(), torch.tensor(ref.intercept_).double(), Xt, yt, a.C).item()
    ours_obj = objective(ours.W.double(), ours.b.double(), Xt, yt, a.C).item()
    print(json.dumps({
        "n_train": a.n, "d": a.d, "classes": 10, "C": a.C, "threads": torch.get_num_threads(),
        "ours": {"seconds": statistics.median(t_ours), "iterations": ours.iterations,
                 "test_accuracy": ours.accuracy(Xte, yte), "objective_nats": ours_obj, "dtype": "float32"},
        "sklearn": {"seconds": statistics.median(t_ref), "iterations": int(ref.n_iter_.max()),
                    "test_accuracy": float(ref.score(Xte, yte)), "objective_nats": ref_obj, "dtype": "float32 in"},
        "load_avg_before_after": [load0, os.getloadavg()[0]],
    }, indent=2))


if __name__ == "__main__":
    main()
