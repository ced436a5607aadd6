"""Linear probes: the protocol on constructed features, the choice blind to test labels, low-data draws,
feature extraction in one pass, and `run_probe` end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt.errors import IgptError
from igpt.features import concat_layers, draw_per_class, extract_features, pixel_features, raw_pixel_features
from igpt.logreg import fit_batch
from igpt.model import ar_inputs
from igpt.palette import Palette
from igpt.probe import ProbeConfig, low_data, probe_protocol, run_probe
from igpt.shards import load_shards


def write_shards(root: Path, n_px=4, k=6, counts=(120, 40, 60), n_classes=3, seed=0, pixels=False) -> Path:
    """Small labelled grey shards in the `igpt prepare` layout; images of class c are brighter with c."""
    from igpt.io import atomic_write_bytes
    from igpt.shards import FORMAT, FORMAT_VERSION

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    pal = Palette(np.linspace(-1, 1, k, dtype=np.float32)[:, None])
    pal.save(root / "palette.npy")
    for split, n in zip(("train", "val", "test"), counts):
        y = np.arange(n) % n_classes
        ids = np.clip(rng.integers(0, k - n_classes + 1, size=(n, n_px * n_px)) + y[:, None], 0, k - 1)
        np.save(root / f"{split}_tokens.npy", ids.astype(np.uint16))
        np.save(root / f"{split}_labels.npy", y.astype(np.int64))
        if pixels:  # images before quantization: a class-dependent offset far above their noise
            px = rng.integers(100, 110, size=(n, n_px, n_px, 1)) + 20 * y[:, None, None, None]
            np.save(root / f"{split}_pixels.npy", px.astype(np.uint8))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "n_px": n_px, "channels": 1, "palette_size": k,
            "palette_sha256": pal.hash, "source": "test", "labels": True,
            "counts": dict(zip(("train", "val", "test"), counts))}
    atomic_write_bytes(root / "meta.json", json.dumps(meta).encode())
    return root


def layered(seed=0, n=(150, 60, 90), informative=2, d=6, classes=3):
    """Feature dicts {layer: (N, d)} for train/val/test where only ``informative`` separates the classes."""
    rng = np.random.default_rng(seed)
    out, ys = [], []
    for m in n:
        y = np.arange(m) % classes
        f = {l: rng.normal(size=(m, d)).astype(np.float32) for l in range(4)}  # noqa: E741
        f[informative][np.arange(m), y] += 4.0
        out.append(f)
        ys.append(y)
    return out, ys


CS = (0.01, 1.0)


def test_linearly_separable_layer_is_found_and_scores_100():
    (tr, va, te), (ytr, yva, yte) = layered()
    res = probe_protocol(tr, ytr, va, yva, te, yte, CS, 3)
    assert res["best_layer"] == 2
    assert res["val_accuracy"] == 1.0 and res["test_accuracy"] >= 0.99
    assert [r["layer"] for r in res["per_layer"]] == [0, 1, 2, 3]
    assert all(r["test_accuracy"] < 0.7 for r in res["per_layer"] if r["layer"] != 2)  # noise layers near chance


def test_batches_split_by_memory_give_the_same_choice(monkeypatch):
    """Layers, and the C grid itself, split into several fits when the logits would pass BATCH_ELEMENTS: the
    same choice and accuracies as one batch."""
    import igpt.probe as P

    (tr, va, te), (ytr, yva, yte) = layered(seed=3)
    Cs = (1e-3, 0.1, 10.0)
    whole = probe_protocol(tr, ytr, va, yva, te, yte, Cs, 3)
    monkeypatch.setattr(P, "BATCH_ELEMENTS", 3 * len(ytr))  # one C of one layer per fit
    assert P._batches(list(tr), tr, 1, len(ytr), 3) == [[0], [1], [2], [3]]
    split = probe_protocol(tr, ytr, va, yva, te, yte, Cs, 3)
    assert split["best_layer"] == whole["best_layer"] == 2 and split["C"] == whole["C"]
    for a, b in zip(split["per_layer"], whole["per_layer"]):
        assert a["C"] == b["C"] and a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=0.02)


def test_low_data_fits_split_by_memory_give_the_same_results(monkeypatch):
    """The low-data protocol fitted every seed at every C in one batch whatever its size (K x classes rows per
    problem); it now splits seeds and grid at BATCH_ELEMENTS logits, with the same results."""
    import igpt.probe as P

    (tr, va, te), (ytr, yva, yte) = layered(seed=2)
    Cs = (1e-3, 0.1, 10.0)
    whole = low_data(tr[2], ytr, va[2], yva, te[2], yte, (10,), 4, Cs, 3)
    sizes = []

    def counted(X, y, C, *a, **kw):
        sizes.append(np.asarray(C).size * 3 * X.shape[1])  # problems x classes x examples
        return fit_batch(X, y, C, *a, **kw)

    monkeypatch.setattr(P, "fit_batch", counted)
    monkeypatch.setattr(P, "BATCH_ELEMENTS", 2 * 3 * 30)  # two problems of 30 examples per fit
    split = low_data(tr[2], ytr, va[2], yva, te[2], yte, (10,), 4, Cs, 3)
    assert len(sizes) == 4 * 2 and max(sizes) <= P.BATCH_ELEMENTS  # 4 seeds x (2 + 1 of the 3 Cs)
    assert split[0]["Cs"] == whole[0]["Cs"]
    assert split[0]["accuracies"] == pytest.approx(whole[0]["accuracies"], abs=0.02)


def test_poisoned_test_labels_do_not_change_the_choice():
    (tr, va, te), (ytr, yva, yte) = layered(seed=1)
    for l in tr:  # noqa: E741 - make the choice of C matter: every layer weakly informative
        for f, y in ((tr[l], ytr), (va[l], yva), (te[l], yte)):
            f[np.arange(len(y)), y] += 0.5 * l
    clean = probe_protocol(tr, ytr, va, yva, te, yte, (1e-3, 0.1, 10.0), 3)
    poisoned = probe_protocol(tr, ytr, va, yva, te, (yte + 1) % 3, (1e-3, 0.1, 10.0), 3)
    assert poisoned["best_layer"] == clean["best_layer"] and poisoned["C"] == clean["C"]
    assert [(r["val_accuracy"], r["C"]) for r in poisoned["per_layer"]] == \
        [(r["val_accuracy"], r["C"]) for r in clean["per_layer"]]
    assert poisoned["test_accuracy"] < clean["test_accuracy"]  # the test labels were really used, after


def test_low_data_draws_exactly_k_per_class_and_differ_across_seeds():
    y = np.repeat(np.arange(4), 30)
    np.random.default_rng(0).shuffle(y)
    draws = [draw_per_class(y, 5, s) for s in range(3)]
    for d in draws:
        assert len(d) == 20 and len(set(d)) == 20
        assert np.bincount(y[d], minlength=4).tolist() == [5, 5, 5, 5]
    assert len({tuple(d) for d in draws}) == 3
    assert np.array_equal(draw_per_class(y, 5, 1), draws[1])  # seeded: reproducible
    with pytest.raises(IgptError, match="fewer than 31"):
        draw_per_class(y, 31, 0)
    with pytest.raises(IgptError, match="class 4 has 0 training examples"):  # a class absent from the labels
        draw_per_class(y, 5, 0, n_classes=5)


def test_low_data_protocol_reports_mean_and_std_per_k():
    (tr, va, te), (ytr, yva, yte) = layered()
    rows = low_data(tr[2], ytr, va[2], yva, te[2], yte, (2, 10), 3, CS, 3)
    assert [r["labels_per_class"] for r in rows] == [2, 10]
    for r in rows:
        assert len(r["accuracies"]) == 3 and len(r["Cs"]) == 3
        assert r["mean"] == pytest.approx(np.mean(r["accuracies"])) and r["std"] == pytest.approx(np.std(r["accuracies"]))
    assert rows[1]["mean"] > 0.95


def test_features_one_forward_per_batch_match_the_model():
    from igpt_testutil import tiny_model

    model = tiny_model(n_px=4, palette_size=6, n_layer=3)
    tokens = np.random.default_rng(0).integers(0, 6, size=(10, 16)).astype(np.uint16)
    calls = []
    orig = model.features
    model.features = lambda idx, layers, mask=None: calls.append(list(layers)) or orig(idx, layers, mask)
    f = extract_features(model, tokens, [3, 1], batch_size=4)
    assert calls == [[1, 3]] * 3  # 3 batches, one call each for both layers
    with torch.no_grad():
        ref = orig(ar_inputs(torch.from_numpy(tokens.astype(np.int64)), 6), [1, 3])
    for l in (1, 3):  # noqa: E741
        assert f[l].shape == (10, 24) and np.allclose(f[l], ref[l].numpy(), atol=1e-6)


def test_pixel_features_and_concat():
    pal = Palette(np.array([[-1.0], [0.0], [1.0]], dtype=np.float32))
    x = pixel_features(np.array([[0, 1, 2, 2]], dtype=np.uint16), pal)
    assert x.shape == (1, 4) and np.allclose(x, [[-1, 0.0039216, 1, 1]], atol=1e-4)  # rint(127.5) = 128
    feats = {l: np.full((2, 3), l, dtype=np.float32) for l in range(5)}  # noqa: E741
    ls, cat = concat_layers(feats, 4, 1)
    assert ls == [3, 4] and cat.shape == (2, 6)


def test_probe_config_is_validated():
    with pytest.raises(IgptError, match="layers must be"):
        ProbeConfig("c", "d", "o", layers="1,x")
    with pytest.raises(IgptError, match="labels_per_class"):
        ProbeConfig("c", "d", "o", labels_per_class=(0,))
    with pytest.raises(IgptError, match="Cs must be"):
        ProbeConfig("c", "d", "o", Cs=(0.0,))
    with pytest.raises(IgptError, match="Cs must be finite"):  # inf made probe.json invalid JSON (Infinity)
        ProbeConfig("c", "d", "o", Cs=(float("inf"), 1.0))
    with pytest.raises(IgptError, match="layers 0..2"):
        ProbeConfig("c", "d", "o", layers="0,3").layer_list(2)


def test_run_probe_end_to_end(tmp_path, monkeypatch):
    from igpt_testutil import tiny_model

    import igpt.features as F
    from igpt.checkpoint import save_model

    def no_hashing(path):  # without --cache, no file is hashed (a cache key reads every byte of weights and tokens)
        raise AssertionError(f"hashed {path} without a cache")

    monkeypatch.setattr(F, "file_sha256", no_hashing)
    sh = write_shards(tmp_path / "sh")
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    res = run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out"), concat=1, labels_per_class=(3,),
                                seeds=2, Cs=(0.1, 1.0)))
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert saved["best_layer"] == res["best_layer"] in (0, 1, 2)
    for key in ("per_layer", "best_layer", "test_accuracy", "baseline_test_accuracy", "baseline_input", "low_data"):
        assert key in saved
    assert {"labels_per_class", "mean", "std", "baseline_mean", "baseline_std"} <= set(saved["low_data"][0])
    assert saved["baseline_test_accuracy"] > 0.8  # brightness separates the classes in pixel space
    assert (tmp_path / "out" / "probe.png").read_bytes()[:4] == b"\x89PNG"
    b = res["best_layer"]
    assert saved["concat"]["layers"] == [i for i in (b - 1, b, b + 1) if 0 <= i <= 2]


def test_run_probe_refuses_empty_splits_and_absent_classes(tmp_path):
    """One-line errors before any feature is computed: an empty val split (`prepare --val-fraction 0` makes
    one), and a class that the low-data protocol cannot draw K of because train has none of it."""
    from igpt_testutil import tiny_model

    from igpt.checkpoint import save_model

    sh = write_shards(tmp_path / "sh", counts=(120, 0, 60))
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    with pytest.raises(IgptError, match="empty: val"):
        run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out")))
    sh = write_shards(tmp_path / "sh2")
    np.save(sh / "train_labels.npy", np.arange(120) % 2)  # class 2 only in val and test
    with pytest.raises(IgptError, match="class 2 has 0 training examples, fewer than 3"):
        run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out"), labels_per_class=(3,)))
    assert not (tmp_path / "out").exists()


def test_concat_window_outside_the_requested_layers_and_non_finite_features(tmp_path):
    """--concat K with --layers: the window's layers that --layers left out were silently dropped (often the
    best layer alone was reported as "concatenated"); they are now computed. A model with NaN weights gave
    NaN features and a "chance accuracy" probe with exit status 0; now an error naming the layer and split."""
    from igpt_testutil import tiny_model

    from igpt.checkpoint import save_model

    sh = write_shards(tmp_path / "sh")
    model = tiny_model(n_px=4, palette_size=6)
    ck = save_model(tmp_path / "ck", model, Palette.load(sh / "palette.npy"))
    res = run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out"), layers="0,2", concat=1, Cs=(1.0,)))
    assert not any("max-iter" in w for w in res["warnings"])
    b = res["best_layer"]
    assert [r["layer"] for r in res["per_layer"]] == [0, 2]  # the per-layer results: the layers asked for
    assert res["concat"]["layers"] == [i for i in (b - 1, b, b + 1) if 0 <= i <= 2]  # the whole window
    few = run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out1"), Cs=(1.0,), max_iter=1))
    assert any(re.fullmatch(r"\d+ of \d+ logistic-regression fits stopped at --max-iter 1 before converging "
                            r"\(C = 1\): raise --max-iter", w) for w in few["warnings"]), few["warnings"]
    stuck = few["unconverged_fits"]  # the same, as fields (the demo words it for its own cap)
    assert stuck["max_iter"] == 1 and stuck["Cs"] == [1.0] and 0 < stuck["stopped"] <= stuck["fits"]
    assert stuck["warning"] in few["warnings"] and "unconverged_fits" not in res
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    ck = save_model(tmp_path / "ck_nan", model, Palette.load(sh / "palette.npy"))
    with pytest.raises(IgptError, match="ck_nan: the layer 1 features of the train split are not finite"):
        run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out2"), Cs=(1.0,)))


def test_tiny_c_is_fitted_in_float64_and_nan_features_are_refused():
    """At C * n far below 1 the float32 line search saw no decrease at float resolution and stopped at W = 0
    (every prediction class 0: 33% against sklearn's 60% at C = 1e-8, n = 300); such problems are fitted in
    float64 and returned in float32."""
    from sklearn.linear_model import LogisticRegression

    from igpt.logreg import Standardizer, fit_batch, fit_logreg

    rng = np.random.default_rng(0)
    n, K, d = 300, 3, 8
    y = np.arange(n) % K
    X = rng.normal(size=(n, d))
    X[np.arange(n), y % d] += 1.0
    Z = Standardizer.fit(X)(X).astype(np.float32)
    for C in (1e-8, 1e-6):
        ours = fit_logreg(Z, y, C, K)
        ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=10000).fit(Z, y)
        assert ours.W.dtype == torch.float32 and ours.W.abs().max() > 0
        assert np.abs(ours.W.cpu().numpy() - ref.coef_).max() < 1e-3 * np.abs(ref.coef_).max()
        assert (ours.predict(Z) == ref.predict(Z)).mean() > 0.99
    Z[3, 2] = np.nan
    with pytest.raises(IgptError, match="the features hold NaN or inf"):
        fit_batch(Z[None], y[None], [[1.0]], K)


def test_the_class_count_never_comes_from_test_labels(tmp_path):
    """K (softmax rows; for two classes also the penalty's scale) from the class names or train + val: a test
    label above them used to add a class and so change the fits that val chooses from; now it is refused."""
    from igpt_testutil import tiny_model

    from igpt.checkpoint import save_model
    from igpt.shards import class_count

    y = {"train": np.array([0, 1, 1]), "val": np.array([1, 0]), "test": np.array([0, 1])}
    assert class_count(y, None, "d") == 2 and class_count(y, ["a", "b", "c"], "d") == 3
    with pytest.raises(IgptError, match="test label 2 is outside the 2 classes of train and val"):
        class_count({**y, "test": np.array([2, 0])}, None, "d")
    assert class_count({**y, "test": np.array([2, 0])}, ["a", "b", "c"], "d") == 3
    sh = write_shards(tmp_path / "sh")
    np.save(sh / "test_labels.npy", np.load(sh / "test_labels.npy") + 5)  # labels 5..7: no such class
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    with pytest.raises(IgptError, match="test label 7 is outside the 3 classes"):
        run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / "out")))


def test_baseline_reads_the_pixels_before_quantization(tmp_path):
    from igpt_testutil import tiny_model

    from igpt.checkpoint import save_model

    pal = None
    for name, pixels in (("tokens", False), ("pixels", True)):
        sh = write_shards(tmp_path / name, n_classes=2, pixels=pixels)
        pal = pal or Palette.load(sh / "palette.npy")
        ck = save_model(tmp_path / f"ck-{name}", tiny_model(n_px=4, palette_size=6), pal)
        res = run_probe(ProbeConfig(str(ck), str(sh), str(tmp_path / f"out-{name}"), layers="0", Cs=(1.0,)))
        shards = load_shards(sh)
        x = {s: raw_pixel_features(shards.pixels(s)) if pixels else pixel_features(shards.tokens(s), pal)
             for s in ("train", "val", "test")}
        y = {s: shards.labels(s) for s in x}
        want = probe_protocol({0: x["train"]}, y["train"], {0: x["val"]}, y["val"], {0: x["test"]}, y["test"],
                              (1.0,), 2)
        assert res["baseline_test_accuracy"] == want["test_accuracy"]
        if pixels:
            assert "before quantization" in res["baseline_input"] and res["baseline_test_accuracy"] > 0.95
        else:
            assert "palette colours" in res["baseline_input"]


def test_feature_cache_is_reused_extended_and_invalidated(tmp_path, monkeypatch):
    from igpt_testutil import tiny_model

    import igpt.features as F
    from igpt.checkpoint import save_model
    from igpt.shards import load_shards

    sh = load_shards(write_shards(tmp_path / "sh"))
    model = tiny_model(n_px=4, palette_size=6)
    ck = save_model(tmp_path / "ck", model, sh.palette)
    cache = tmp_path / "cache"
    cache.mkdir()
    tokens = sh.tokens("val")
    calls = []
    real = F.extract_features
    monkeypatch.setattr(F, "extract_features", lambda m, t, ls, *a: calls.append(list(ls)) or real(m, t, ls, *a))
    first = F.cached_features(model, tokens, [0, 2], 16, "cpu", cache, F.cache_keys(ck, sh, ["val"])["val"])
    again = F.cached_features(model, tokens, [0, 1, 2], 16, "cpu", cache, F.cache_keys(ck, sh, ["val"])["val"])
    assert calls == [[0, 2], [1]]  # the second call computes only the missing layer
    assert all(np.array_equal(first[i], again[i]) for i in (0, 2)) and set(again) == {0, 1, 2}
    save_model(ck, model, sh.palette)  # the same weights written anew: still the same features
    F.cached_features(model, tokens, [0], 16, "cpu", cache, F.cache_keys(ck, sh, ["val"])["val"])
    assert len(calls) == 2
    # other weights of the same shape copied over with the old file's timestamp (cp -p, rsync -a, an archive):
    # same path, size and mtime, which was all the key held of the weights; now their hash tells them apart
    w = ck / "model.safetensors"
    st = w.stat()
    other = save_model(tmp_path / "other", tiny_model(seed=5, n_px=4, palette_size=6), sh.palette)
    shutil.copyfile(other / "model.safetensors", w)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (w.stat().st_size, w.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    F.cached_features(model, tokens, [0], 16, "cpu", cache, F.cache_keys(ck, sh, ["val"])["val"])
    assert calls[-1] == [0] and not (cache / "val_layer2.npy").exists()
    # shards prepared anew at the same path with as many images and the same palette: other tokens, other key
    n = len(calls)
    shutil.rmtree(sh.root)
    sh2 = load_shards(write_shards(tmp_path / "sh", seed=1))
    fresh = F.cached_features(model, sh2.tokens("val"), [0], 16, "cpu", cache, F.cache_keys(ck, sh2, ["val"])["val"])
    assert len(calls) == n + 1
    assert np.array_equal(fresh[0], real(model, sh2.tokens("val"), [0], 16, "cpu")[0])
    # a damaged cache (a truncated layer file, an unreadable key file) is recomputed, not a traceback
    key = F.cache_keys(ck, sh2, ["val"])["val"]
    (cache / "val_layer0.npy").write_bytes((cache / "val_layer0.npy").read_bytes()[:100])
    again = F.cached_features(model, sh2.tokens("val"), [0], 16, "cpu", cache, key)
    assert len(calls) == n + 2 and np.array_equal(again[0], fresh[0])
    (cache / "val_key.json").write_text("{")
    F.cached_features(model, sh2.tokens("val"), [0], 16, "cpu", cache, key)
    assert len(calls) == n + 3 and F.cached_features(model, sh2.tokens("val"), [0], 16, "cpu", cache, key)
    assert len(calls) == n + 3  # and the cache works again
