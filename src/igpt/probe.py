"""`igpt probe`: per-layer linear probes, the raw-pixel baseline and the low-data protocol (Chen et al. 2020).

Protocol (the choice never sees test labels):
1. pooled features of every requested layer for train, val and test (igpt.features, one pass per split);
2. per layer, standardise with train statistics and fit L2 logistic regression (igpt.logreg) on train for
   each C of the grid; the layer's val accuracy is its best over C;
3. the best layer (and its C) is the highest val accuracy (ties: the shallower layer);
4. every layer is then refitted on train + val (standardised with their statistics) with its own C and scored
   on test, which gives the accuracy-against-depth curve; the best layer's test accuracy is the headline;
5. the raw-pixel baseline runs steps 2-4 on the pixel values of the same images at the model's n_px, before
   quantization (the shards' ``*_pixels.npy``); shards without them (``prepare --no-pixels``, OpenAI's data)
   fall back to the palette colours of the tokens (igpt.features.pixel_features); when the source's images
   are larger (``*_native.npy``, e.g. 28x28 Fashion-MNIST for a 16x16 model), also at that resolution
   (``baseline_native_*``);
6. low data: for each K and seed, exactly K train images per class (igpt.features.draw_per_class); C is
   re-swept on the full val split for every draw (the right strength depends strongly on K); standardisation
   uses the statistics of the whole train split (no labels needed); the layer is the one chosen in 3.
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from igpt.errors import IgptError
from igpt.features import draw_per_class
from igpt.io import atomic_write_bytes, figure_png, output_lock
from igpt.logreg import ConvergenceWarning, Standardizer, best_index, fit_batch

PROBE_FILE, PLOT_FILE = "probe.json", "probe.png"
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # sklearn's C (inverse L2 strength on the summed loss); a log grid
BASELINE_INPUT = {
    "pixels": "pixel values before quantization at the model's n_px (the shards' *_pixels.npy), scaled to [-1, 1]",
    "palette": ("palette colours of the shards' tokens, scaled to [-1, 1], at the model's n_px (these shards keep "
                "no pixels from before quantization)"),
}


@dataclass
class ProbeConfig:
    checkpoint: str  # model checkpoint directory
    data: str  # token shards with labels and train / val / test splits
    out: str  # directory for probe.json and probe.png
    layers: str = "all"  # 'all' (0 .. n_layer) or comma-separated layer numbers
    concat: int = 0  # > 0: also probe the layers best-k .. best+k concatenated (the paper's ImageNet trick)
    labels_per_class: tuple[int, ...] = ()  # low-data protocol: K labelled train images per class
    seeds: int = 5  # low-data draws per K
    Cs: tuple[float, ...] = DEFAULT_CS  # regularisation grid swept on val
    batch_size: int = 64  # images per forward pass during feature extraction
    max_iter: int = 1000  # L-BFGS iterations per fit
    device: str | None = None  # None: CUDA when present, else CPU
    cache: bool = False  # keep features in OUT/features/*.npy and reuse them (float32 N x d per layer)

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_iter", "seeds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise IgptError(f"probe config: {name} must be a positive integer, got {v!r}")
        if isinstance(self.concat, bool) or not isinstance(self.concat, int) or self.concat < 0:
            raise IgptError(f"probe config: concat must be an integer >= 0, got {self.concat!r}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.labels_per_class):
            raise IgptError(f"probe config: labels_per_class must be positive integers, got {self.labels_per_class}")
        if not self.Cs or any(not (c > 0 and math.isfinite(c)) for c in self.Cs):
            raise IgptError(f"probe config: Cs must be finite positive numbers, got {self.Cs}")
        if self.layers != "all":
            try:
                ls = [int(s) for s in self.layers.split(",")]
            except ValueError:
                raise IgptError(f"probe config: layers must be 'all' or comma-separated integers, got "
                                f"{self.layers!r}") from None
            if not ls or min(ls) < 0:
                raise IgptError(f"probe config: layers must be non-negative, got {self.layers!r}")

    def layer_list(self, n_layer: int) -> list[int]:
        if self.layers == "all":
            return list(range(n_layer + 1))
        ls = sorted({int(s) for s in self.layers.split(",")})
        if ls[-1] > n_layer:
            raise IgptError(f"--layers {self.layers}: the model has layers 0..{n_layer}")
        return ls


# -- the protocol on arrays (pure: tests call these directly) --------------------------------------------------
BATCH_ELEMENTS = 2**27  # logits per batched fit (problems x classes x examples): ~0.5 GB in float32


def _fit(*a, fits: list[int] | None = None, **kw):
    """fit_batch, adding the number of problems it fitted to ``fits[0]`` when given (run_probe's count for
    unconverged_fits: every fit, not only those of the batches that warned)."""
    fit = fit_batch(*a, **kw)
    if fits is not None:
        fits[0] += fit.converged.size
    return fit


def _batches(keys: list, feats: dict, per_key: int, n: int, n_classes: int) -> list[list]:
    """Keys in groups fitted together: the same feature width, at most BATCH_ELEMENTS logits per group."""
    cap = max(1, BATCH_ELEMENTS // max(1, per_key * n_classes * n))
    groups: dict[int, list] = {}
    for k in keys:
        groups.setdefault(feats[k].shape[1], []).append(k)
    return [g[i:i + cap] for g in groups.values() for i in range(0, len(g), cap)]


def select(train: dict, ytr, val: dict, yva, Cs, n_classes: int, **kw) -> dict:
    """Per key (layer) of ``train``/``val`` feature dicts: {key: (val accuracy, best C)}, fit on train (every
    key and C of a batch in one ``fit_batch``, the grid split when one key's fits alone pass BATCH_ELEMENTS;
    each key standardised with its train statistics)."""
    res = {}
    pc = max(1, min(len(Cs), BATCH_ELEMENTS // max(1, n_classes * len(ytr))))  # C values per fit
    for keys in _batches(list(train), train, pc, len(ytr), n_classes):
        std = [Standardizer.fit(train[k]) for k in keys]
        Xtr, Xva = (np.stack([s(f[k]) for s, k in zip(std, keys)]) for f in (train, val))
        accs = np.concatenate([_fit(Xtr, np.tile(ytr, (len(keys), 1)), [list(Cs[i:i + pc])] * len(keys),
                                         n_classes, **kw).accuracy(Xva, np.asarray(yva)[None])
                               for i in range(0, len(Cs), pc)], axis=1)
        res.update({k: (float(row[j]), float(Cs[j])) for k, row in zip(keys, accs) for j in [best_index(row, Cs)]})
    return {k: res[k] for k in train}


def refit(train: dict, ytr, val: dict, yva, test: dict, yte, Cs: dict, n_classes: int, **kw) -> dict:
    """Per key: fit on train + val (standardised with their statistics) at that key's C in ``Cs``; -> {key:
    test accuracy}."""
    ytv = np.concatenate([ytr, yva])
    res = {}
    for keys in _batches(list(train), train, 1, len(ytv), n_classes):
        tv = [np.concatenate([train[k], val[k]]) for k in keys]
        std = [Standardizer.fit(x) for x in tv]
        fit = _fit(np.stack([s(x) for s, x in zip(std, tv)]), np.tile(ytv, (len(keys), 1)),
                        [[Cs[k]] for k in keys], n_classes, **kw)
        accs = fit.accuracy(np.stack([s(test[k]) for s, k in zip(std, keys)]), np.asarray(yte)[None])
        res.update({k: float(a[0]) for k, a in zip(keys, accs)})
    return res


def best_key(choice: dict):
    """The key with the highest val accuracy; ties go to the smallest key (the shallower layer)."""
    return min(choice, key=lambda k: (-choice[k][0], k))


def probe_protocol(train: dict, ytr, val: dict, yva, test: dict, yte, Cs, n_classes: int, **kw) -> dict:
    """Steps 2-4 of the module docstring on feature dicts {layer: (N, d)}. Test labels are used only after the
    choice. -> {'per_layer': [{layer, val_accuracy, test_accuracy, C}], 'best_layer', 'C', 'val_accuracy',
    'test_accuracy'}."""
    choice = select(train, ytr, val, yva, Cs, n_classes, **kw)
    best = best_key(choice)
    tacc = refit(train, ytr, val, yva, test, yte, {k: C for k, (_, C) in choice.items()}, n_classes, **kw)
    rows = [{"layer": k, "val_accuracy": vacc, "test_accuracy": tacc[k], "C": C} for k, (vacc, C) in choice.items()]
    top = next(r for r in rows if r["layer"] == best)
    return {"per_layer": rows, "best_layer": best, "C": top["C"], "val_accuracy": top["val_accuracy"],
            "test_accuracy": top["test_accuracy"]}


def low_data(Xtr, ytr, Xva, yva, Xte, yte, ks, seeds: int, Cs, n_classes: int, **kw) -> list[dict]:
    """Step 6 for one feature set: [{labels_per_class, accuracies (per seed), mean, std, Cs (chosen per seed)}].
    Per K, the seeds' draws at every C are one batched fit; each seed's model at its val-chosen C is scored on
    test (a refit on the same draw at that C would be the same problem); the seeds and the grid are split into
    several fits where one would pass BATCH_ELEMENTS logits."""
    s = Standardizer.fit(Xtr)
    Ztr, Zva, Zte = s(Xtr), s(Xva), s(Xte)
    out = []
    for k in ks:
        idx = [draw_per_class(ytr, k, seed, n_classes) for seed in range(seeds)]
        per_fit = n_classes * len(idx[0])  # logits per problem
        pc = max(1, min(len(Cs), BATCH_ELEMENTS // per_fit))  # C values per fit
        sc = max(1, min(seeds, BATCH_ELEMENTS // (pc * per_fit)))  # seeds per fit
        val, test = np.zeros((seeds, len(Cs))), np.zeros((seeds, len(Cs)))  # accuracy per seed and C
        for a in range(0, seeds, sc):
            for c in range(0, len(Cs), pc):
                part = idx[a:a + sc]
                fit = _fit(np.stack([Ztr[i] for i in part]), np.stack([ytr[i] for i in part]),
                                [list(Cs[c:c + pc])] * len(part), n_classes, **kw)
                val[a:a + sc, c:c + pc] = fit.accuracy(Zva[None], np.asarray(yva)[None])
                test[a:a + sc, c:c + pc] = fit.accuracy(Zte[None], np.asarray(yte)[None])
        pick = [best_index(row, Cs) for row in val]
        accs = [float(test[i, j]) for i, j in enumerate(pick)]
        out.append({"labels_per_class": k, "accuracies": accs, "mean": float(np.mean(accs)),
                    "std": float(np.std(accs)), "Cs": [float(Cs[j]) for j in pick]})
    return out


# -- the command ----------------------------------------------------------------------------------------------
def check_finite(feats: dict, checkpoint: str) -> None:
    """IgptError naming the first layer and split whose features hold NaN or inf (a damaged or diverged model:
    the fits then reported chance accuracy with exit status 0)."""
    for s, by_layer in feats.items():
        for l, f in by_layer.items():  # noqa: E741
            if not np.isfinite(f).all():
                raise IgptError(f"{checkpoint}: the layer {l} features of the {s} split are not finite (NaN or "
                                "inf): damaged weights or a diverged run")


def unconverged(caught: list, max_iter: int, fits: int) -> dict | None:
    """The ConvergenceWarnings among ``caught`` (warnings.catch_warnings records) summed over the ``fits``
    problems fitted: {stopped, fits, max_iter, Cs, warning (the line for probe.json's warnings)}, None when there
    are none; the other warnings are issued again."""
    stopped, Cs = 0, set()
    for w in caught:
        if isinstance(w.message, ConvergenceWarning):
            stopped += w.message.stopped
            Cs.update(w.message.Cs)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not stopped:
        return None
    Cs = sorted(Cs)
    return {"stopped": stopped, "fits": fits, "max_iter": max_iter, "Cs": Cs,
            "warning": f"{stopped} of {fits} logistic-regression fits stopped at --max-iter {max_iter} before "
                       f"converging (C = {', '.join(f'{c:g}' for c in Cs)}): raise --max-iter"}


def run_probe(cfg: ProbeConfig) -> dict:
    """Run the whole protocol for a checkpoint and shards; write OUT/probe.json and OUT/probe.png."""
    with output_lock(cfg.out):  # its feature cache and outputs
        return _run_probe(cfg)


def _run_probe(cfg: ProbeConfig) -> dict:
    from igpt.checkpoint import load_model
    from igpt.distributed import get_dist_info, pick_device
    from igpt.evaluate import check_compatible
    from igpt.features import cache_keys, cached_features, concat_layers, pixel_features, raw_pixel_features
    from igpt.io import check_writable
    from igpt.shards import check_two_classes, class_count, load_shards

    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise IgptError(f"--out {cfg.out} exists and is not a directory")
    shards = load_shards(cfg.data)
    missing = [s for s in ("train", "val", "test") if s not in shards.splits or shards.labels(s) is None]
    if missing:
        raise IgptError(f"{cfg.data}: the probe needs labelled train, val and test splits; missing or "
                        f"unlabelled: {', '.join(missing)}")
    device = pick_device(cfg.device, get_dist_info())
    cache = Path(cfg.out) / "features" if cfg.cache else None
    splits = ("train", "val", "test")  # the weights hashed before they are read: a writer in between must not
    keys = cache_keys(cfg.checkpoint, shards, splits) if cache is not None else dict.fromkeys(splits)  # key them
    model, palette = load_model(cfg.checkpoint, device)
    check_compatible(model.config, shards, palette)
    layers = cfg.layer_list(model.config.n_layer)
    if cfg.concat > model.config.n_layer:  # past both ends whatever layer is chosen (and a huge K looped for ever)
        raise IgptError(f"--concat {cfg.concat}: the window best-{cfg.concat}..best+{cfg.concat} is past both ends "
                        f"of the model's layers 0..{model.config.n_layer} whatever layer is chosen; give at most "
                        f"{model.config.n_layer}")
    y = {s: shards.labels(s).astype(np.int64) for s in splits}
    empty = [s for s in splits if len(y[s]) == 0]
    if empty:
        raise IgptError(f"{cfg.data}: the probe needs images in train, val and test; empty: {', '.join(empty)}")
    n_classes = class_count(y, shards.meta.get("class_names"), cfg.data)
    check_two_classes(y["train"], cfg.data, "the probe")
    counts = np.bincount(y["train"], minlength=n_classes)  # every class, those absent from train included
    if cfg.labels_per_class and max(cfg.labels_per_class) > counts.min():  # fail before any feature is computed
        raise IgptError(f"--labels-per-class {max(cfg.labels_per_class)}: class {int(counts.argmin())} has "
                        f"{int(counts.min())} training examples, fewer than {max(cfg.labels_per_class)}")
    for name in (PROBE_FILE, PLOT_FILE):  # before the features and fits, not after them
        check_writable(Path(cfg.out) / name)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    feats = {s: cached_features(model, shards.tokens(s), layers, cfg.batch_size, device, cache, keys[s])
             for s in splits}
    check_finite(feats, cfg.checkpoint)
    fits = [0]  # problems fitted, counted by _fit
    kw = {"max_iter": cfg.max_iter, "device": device, "fits": fits}
    with warnings.catch_warnings(record=True) as caught:  # ConvergenceWarnings: summed into res["warnings"]
        warnings.simplefilter("always", ConvergenceWarning)
        res = probe_protocol(feats["train"], y["train"], feats["val"], y["val"], feats["test"], y["test"], cfg.Cs,
                             n_classes, **kw)
        raw = {s: shards.pixels(s) for s in splits}
        kind = "pixels" if all(v is not None for v in raw.values()) else "palette"
        baselines = {"": {s: raw_pixel_features(raw[s]) if kind == "pixels"
                          else pixel_features(shards.tokens(s), shards.palette) for s in splits}}
        native = {s: shards.pixels(s, native=True) for s in splits}
        if all(v is not None for v in native.values()):  # the source's own, higher resolution
            baselines["native_"] = {s: raw_pixel_features(native[s]) for s in splits}
            res["native_px"] = shards.meta["native_px"]
        for prefix, pix in baselines.items():
            base = probe_protocol({0: pix["train"]}, y["train"], {0: pix["val"]}, y["val"], {0: pix["test"]}, y["test"],
                                  cfg.Cs, n_classes, **kw)
            res.update({f"baseline_{prefix}val_accuracy": base["val_accuracy"],
                        f"baseline_{prefix}test_accuracy": base["test_accuracy"], f"baseline_{prefix}C": base["C"]})
        res["baseline_input"] = BASELINE_INPUT[kind]
        best = res["best_layer"]
        if cfg.concat:
            lo, hi = max(0, best - cfg.concat), min(model.config.n_layer, best + cfg.concat)
            window = [l for l in range(lo, hi + 1) if l not in feats["train"]]  # noqa: E741
            if window:  # layers of the window that --layers left out: one more pass (it had cut the window short)
                more = {s: cached_features(model, shards.tokens(s), window, cfg.batch_size, device, cache, keys[s])
                        for s in splits}
                check_finite(more, cfg.checkpoint)
                feats = {s: {**feats[s], **more[s]} for s in splits}
            ls = concat_layers(feats["train"], best, cfg.concat)[0]
            cat = {s: {best: concat_layers(feats[s], best, cfg.concat)[1]} for s in splits}
            c = probe_protocol(cat["train"], y["train"], cat["val"], y["val"], cat["test"], y["test"], cfg.Cs,
                               n_classes, **kw)
            res["concat"] = {"layers": ls, "val_accuracy": c["val_accuracy"],
                             "test_accuracy": c["test_accuracy"], "C": c["C"]}
        if cfg.labels_per_class:
            args = (cfg.labels_per_class, cfg.seeds, cfg.Cs, n_classes)
            rows = low_data(feats["train"][best], y["train"], feats["val"][best], y["val"], feats["test"][best],
                            y["test"], *args, **kw)
            for prefix, pix in baselines.items():  # the same draws (seeded by seed and K) for every baseline
                theirs = low_data(pix["train"], y["train"], pix["val"], y["val"], pix["test"], y["test"], *args, **kw)
                rows = [{**o, f"baseline_{prefix}mean": b["mean"], f"baseline_{prefix}std": b["std"],
                         f"baseline_{prefix}accuracies": b["accuracies"], f"baseline_{prefix}Cs": b["Cs"]}
                        for o, b in zip(rows, theirs)]
            res["low_data"] = rows
            res["low_data_protocol"] = ("exactly K train images per class drawn per seed (the same draws for the baseline); C re-swept on the full val "
                                        "split for every draw; standardised with whole-train statistics; layer "
                                        f"{best} (chosen on val with all labels); mean and std over seeds")
    edge = [f"{what} chose C = {c:g}, the edge of the grid: widen --cs" for what, c in
            (("the probe", res["C"]), ("the baseline", res["baseline_C"])) if c in (min(cfg.Cs), max(cfg.Cs))]
    stuck = unconverged(caught, cfg.max_iter, fits[0])
    if stuck is not None:
        res["unconverged_fits"] = stuck
    res.update({
        "warnings": (edge if len(cfg.Cs) > 1 else []) + ([stuck["warning"]] if stuck else []),
        "accuracy_unit": "fraction in [0, 1]", "mode": model.config.mode, "n_classes": n_classes,
        "counts": {s: len(y[s]) for s in splits}, "C_grid": list(cfg.Cs),
        "objective": "sklearn LogisticRegression(C, lbfgs): C * sum CE + ||W||^2 / 2, multinomial, bias unpenalised",
        "checkpoint": str(cfg.checkpoint), "data": str(cfg.data), "config": asdict(cfg),
    })
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / PROBE_FILE, (json.dumps(res, indent=2) + "\n").encode())
    atomic_write_bytes(out / PLOT_FILE, plot_png(res))
    return res


def plot_png(res: dict) -> bytes:
    """Accuracy (%) against layer, val and test, with the raw-pixel baseline's test accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - for matplotlib.ticker below

    rows = res["per_layer"]
    ls = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ls, [100 * r["val_accuracy"] for r in rows], "o-", label="val (chooses the layer)")
    ax.plot(ls, [100 * r["test_accuracy"] for r in rows], "s-", label="test")
    ax.axhline(100 * res["baseline_test_accuracy"], color="grey", ls="--", label="raw pixels (test)")
    if "baseline_native_test_accuracy" in res:
        ax.axhline(100 * res["baseline_native_test_accuracy"], color="grey", ls=":",
                   label=f"raw pixels at {res['native_px']}x{res['native_px']} (test)")
    if "concat" in res:
        c = res["concat"]
        ax.plot([res["best_layer"]], [100 * c["test_accuracy"]], "*", ms=12, color="C2",
                label=f"layers {c['layers'][0]}-{c['layers'][-1]} concatenated (test)")
    ax.axvline(res["best_layer"], color="k", alpha=0.2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("linear probe accuracy (%)")
    # below the axes: inside, it covered the baselines' lines near the top (they sit above the curves)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    return figure_png(fig)
