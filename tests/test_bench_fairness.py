"""The benchmark suite compares like with like (found by a review in the fifteenth session): memory from the
worker's own baseline, the same tokens, tolerance and device on both sides."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


@pytest.mark.slow
def test_train_worker_memory_baseline_is_its_own_not_the_parents_peak():
    """A worker's ru_maxrss starts at its parent's peak RSS (Linux keeps the pre-exec high-water mark in
    signal->maxrss), so 'import_rss_mb' is the parent's peak and 'peak_mb_above_import' loses that excess.
    In run.py the parent has just run the matmul peak (its 4096^2 matrices): 515.2 MB on every worker of
    bench/results/cpu-icelake-2026-11-27b.json, against ~377 MB for a worker's own imports."""
    driver = f"""
import json, subprocess, sys
import numpy as np
a = np.ones(2000 * 2**20 // 8); del a          # the parent's peak: 2 GB, released before the worker starts
r = subprocess.run([sys.executable, {str(BENCH / 'run.py')!r}, "--worker", "ours", "t16", "1", "fp32"],
                   capture_output=True, text=True)
print(r.stdout.strip().splitlines()[-1] if r.returncode == 0 else r.stderr)
"""
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=300)
    rec = json.loads(out.stdout)
    above = rec["peak_rss_mb"] - rec["import_rss_mb"]
    # a t16 worker's own imports take ~0.4 GB and its training ~0.4-0.5 GB more (see the saved JSONs)
    assert rec["import_rss_mb"] < 1000, f"baseline {rec['import_rss_mb']:.0f} MB is the parent's peak"
    assert above > 100, f"peak above import {above:.0f} MB"


def test_palette_fit_runs_ours_on_the_cpu_like_the_reference(monkeypatch):
    """probe_fit pins ours to device='cpu'; palette_fit calls fit_palette(pixels, k, seed=r), whose default
    device is CUDA when available, so on a CUDA machine ours' GPU fit is timed against sklearn's CPU fit."""
    import bench_palette
    import sklearn.cluster

    class Stub:  # the reference is not under test here
        def __init__(self, *a, **k):
            pass

        def fit(self, x):
            self.inertia_ = 1.0
            return self

    rng = np.random.default_rng(0)
    monkeypatch.setattr(bench_palette, "photo_pixels", lambda n: rng.integers(0, 256, (4000, 3), dtype=np.uint8))
    monkeypatch.setattr(sklearn.cluster, "MiniBatchKMeans", Stub)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a CUDA machine reports
    res = bench_palette.palette_fit_case(quick=True)  # fails: ours goes to torch.device("cuda")
    assert res["ours"]["seconds"] >= 0


def test_probe_fit_sides_stop_at_the_same_tolerance(monkeypatch):
    """Both objectives are mean cross-entropy + ||W||^2 / (2 C n) and both stop on max |gradient|, but ours
    runs at fit_batch's tol=1e-6 and sklearn at its default tol=1e-4: not comparable convergence settings."""
    import bench_probe
    import sklearn.linear_model

    tols = {"ours": set(), "reference": set()}
    real_fit_batch, real_lr = bench_probe.fit_batch, sklearn.linear_model.LogisticRegression

    def fit_batch(*a, **k):
        tols["ours"].add(k.get("tol", 1e-6))  # fit_batch's default
        return real_fit_batch(*a, **k)

    def fit_logreg(X, y, C, n_classes=None, **k):
        tols["ours"].add(k.get("tol", 1e-6))
        from igpt.logreg import fit_logreg as real

        return real(X, y, C, n_classes, **k)

    def lr(**k):
        m = real_lr(**k)
        tols["reference"].add(m.tol)
        return m

    monkeypatch.setattr(bench_probe, "fit_batch", fit_batch)
    monkeypatch.setattr(bench_probe, "fit_logreg", fit_logreg)
    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", lr)
    bench_probe.probe_fit_case(quick=True)
    assert tols["ours"] == tols["reference"], tols


def test_train_worker_sides_train_on_the_same_tokens(monkeypatch):
    """train_worker seeds, builds the model, then draws x from the global generator: the two inits consume
    different amounts of it, so ours and the reference train on different token batches."""
    import bench_model

    import igpt.model

    seen = {}
    real = igpt.model.ar_inputs
    for impl in ("ours", "reference"):
        def spy(x, sos, impl=impl):
            seen[impl] = x.clone()
            return real(x, sos)

        monkeypatch.setattr(igpt.model, "ar_inputs", spy)
        bench_model.train_worker(impl, "t16", 1, "fp32")
    assert torch.equal(seen["ours"], seen["reference"]), \
        f"ours {seen['ours'][0, :4].tolist()} reference {seen['reference'][0, :4].tolist()}"
