"""`igpt demo`: the whole iGPT pipeline on one data set within a wall-time budget, ending in a visual report.

Stages (each one the library's own entry point, so the demo is what a user would run by hand):
1. ``prepare``: palette fit and train / val / test token shards (a test split is held out of train when the
   source has none, e.g. an image folder);
2. ``train``: AR pretraining with the paper's recipe scaled down (Adam betas 0.9/0.95, warm-up then cosine
   decay to zero, no weight decay or dropout). The number of steps is set from a measured step time so that
   the schedule ends inside the budget: training gets what the other stages are estimated to leave;
3. NLL of the val and test splits (``igpt.evaluate.nll``, bits per token);
4. ``probe``: per-layer linear probes chosen on val, with the raw-pixel baseline on the same split;
5. ``sample``: test images completed from their top half, and unconditional samples;
6. ``OUT/report.html`` (self-contained: images embedded) and ``OUT/summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from igpt.budget import plan_steps, step_seconds
from igpt.datasets import BUNDLED
from igpt.errors import IgptError
from igpt.io import atomic_write_bytes, check_replaceable, output_lock
from igpt.settings import check_seed

MARKER, SUMMARY, REPORT = "demo.json", "summary.json", "report.html"
STAGES = 6
# L-BFGS iterations per probe fit: accuracies settle long before the 1000 of `igpt probe`'s default, and the
# weakly regularised fits (large C) would otherwise take most of the demo's time.
PROBE_MAX_ITER = 300
# the probe also fits layers best-2 .. best+2 concatenated (the paper's trick; reported beside the best layer)
PROBE_CONCAT = 2
MAX_MINUTES = 1e7  # ~19 years: far past any budget, and its seconds stay finite through the plan's arithmetic


def is_demo_record(d: dict) -> bool:
    """Whether a demo.json object is one that `igpt demo` wrote: its "config" holds DemoConfig's settings (a
    bare "config" key let a user's own demo.json mark a folder as ours, and the demo deleted it)."""
    c = d.get("config")
    return isinstance(c, dict) and {"out", "data", "minutes", "n_px", "preset", "palette_size"} <= set(c)


@dataclass
class DemoConfig:
    out: str = "runs/demo"  # everything goes here (an old demo there is replaced)
    data: str = BUNDLED  # any source `igpt prepare` reads: a named set, image folder, CIFAR batch, IDX, npz
    data_dir: str | None = None  # where named data sets live (as for prepare)
    minutes: float = 9.0  # wall-time budget of the whole run; training gets what the other stages leave
    n_px: int = 12  # images are resized to n_px x n_px (12: 144 tokens, ~2x the images per second of 16x16)
    palette_size: int | None = None  # None: 16 for grey data, 64 for colour (small, so minutes of CPU suffice)
    preset: str = "cpu-small"  # model size (igpt.presets)
    batch_size: int = 16  # small batches, many steps: measured better features than 32 at the same images seen
    lr: float = 3e-3
    augment: bool = True  # random crop + flip of the training images: measured +0.3 to +0.9 probe points (README)
    steps: int | None = None  # training steps; None: as many as the budget buys (at most max_steps)
    stop_at: int | None = None  # with steps: stop there, on the schedule of ``steps`` (as a time-limited run did)
    max_steps: int = 20000  # upper bound on the steps the budget may buy
    completions: int = 8  # test images completed from their top half
    per_image: int = 4  # completions per test image
    samples: int = 16  # unconditional samples
    seed: int = 0
    device: str | None = None  # None: CUDA when present, else CPU
    progress: bool | None = None  # progress bars; None: when stderr is a terminal

    def __post_init__(self) -> None:
        """Everything checkable without the data, so a bad setting never costs an old demo or minutes of work."""
        from igpt.presets import PRESETS

        if not (0 < self.minutes <= MAX_MINUTES):  # minutes * 60 overflowed to inf past ~3e306: a NaN plan
            raise IgptError(f"demo: --minutes must be a number > 0 and at most {MAX_MINUTES:g}, got {self.minutes}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise IgptError(f"demo: --lr must be a finite number > 0, got {self.lr}")
        if isinstance(self.n_px, bool) or not isinstance(self.n_px, int) or not 2 <= self.n_px <= 1024:
            raise IgptError(f"demo: --n-px must be between 2 and 1024, got {self.n_px!r}")
        if self.palette_size is not None and (isinstance(self.palette_size, bool) or self.palette_size < 2):
            raise IgptError(f"demo: --palette-size must be at least 2, got {self.palette_size!r}")
        if self.preset not in PRESETS:
            raise IgptError(f"demo: unknown model preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        check_seed(self.seed, "demo")
        for name in ("batch_size", "max_steps", "completions", "per_image", "samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise IgptError(f"demo: {name} must be a positive integer, got {v!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise IgptError(f"demo: steps must be a positive integer, got {self.steps!r}")
        if self.stop_at is not None:
            if self.steps is None:
                raise IgptError("demo: --stop-at needs --steps (the schedule it stops on)")
            if isinstance(self.stop_at, bool) or not isinstance(self.stop_at, int) or not 1 <= self.stop_at <= self.steps:
                raise IgptError(f"demo: stop_at must be an integer in [1, steps = {self.steps}], got {self.stop_at!r}")


def _say(stage: int, text: str) -> None:
    print(f"[{stage}/{STAGES}] {text}", flush=True)


def _train_config(cfg: DemoConfig, shards_dir: Path, run_dir: Path, steps: int, time_limit: float | None):
    from igpt.train_config import TrainConfig

    return TrainConfig(
        data=str(shards_dir), preset=cfg.preset, out=str(run_dir), steps=steps, batch_size=cfg.batch_size,
        lr=cfg.lr, warmup=max(1, steps // 10), eval_every=max(1, steps // 5), eval_images=500,
        save_every=steps, log_every=max(1, min(10, steps // 20)), keep=1, seed=cfg.seed, device=cfg.device,
        progress=cfg.progress, augment=cfg.augment, time_limit=time_limit,
        stop_at=cfg.stop_at if cfg.steps == steps else None,
    )


def sample_seed(seed: int) -> int:
    """The seed of the unconditional samples: another stream than the completions' (kept below 2**62)."""
    return (seed + 1) % (1 << 62)


PATH_FLAGS = {"--data", "--out", "--data-dir", "--checkpoint", "--complete-from"}


def commands(cfg: DemoConfig, out: Path, prep, steps: int, done: int) -> list[str]:
    """The `igpt` command lines that reproduce this run: the demo itself, then its stages one by one, into
    OUT/stages (``done``: the steps trained, fewer than ``steps`` when the time limit stopped the loop; `igpt
    train --stop-at` reproduces that)."""
    q = shlex.quote
    # the stages write under OUT/stages: into the demo's own folders `igpt train` refused (a run is there)
    st = out / "stages"
    ckpt = str(st / "run" / "checkpoints" / f"step-{done:06d}")  # what `igpt train` writes
    tc = _train_config(cfg, st / "shards", st / "run", steps, None)  # the settings the demo trained with
    demo = ["igpt", "demo", "--data", cfg.data, "--out", str(out), "--minutes", f"{cfg.minutes:g}", "--steps",
            str(steps), *(["--stop-at", str(done)] if done < steps else []),  # where the time limit stopped it
            "--n-px", str(cfg.n_px), "--palette-size", str(prep.palette_size), "--preset", cfg.preset,
            "--batch-size", str(cfg.batch_size), "--lr", repr(cfg.lr), "--seed", str(cfg.seed)]
    demo.append("--augment" if cfg.augment else "--no-augment")
    for name in ("completions", "per_image", "samples"):  # spelt out when not the default (once --config only)
        if getattr(cfg, name) != getattr(DemoConfig, name):
            demo += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    if cfg.data_dir:
        demo += ["--data-dir", cfg.data_dir]
    stages = [
        ["igpt", "prepare", "--data", cfg.data, "--n-px", str(prep.n_px), "--palette-size", str(prep.palette_size),
         "--test-fraction", f"{prep.test_fraction:g}", "--seed", str(cfg.seed), "--out", str(st / "shards")]
        + (["--data-dir", cfg.data_dir] if cfg.data_dir else []),
        ["igpt", "train", "--data", str(st / "shards"), "--preset", cfg.preset, "--steps", str(steps),
         "--batch-size", str(tc.batch_size), "--lr", repr(tc.lr), "--warmup", str(tc.warmup),
         "--eval-every", str(tc.eval_every), "--eval-images", str(tc.eval_images), "--save-every",
         str(tc.save_every), "--log-every", str(tc.log_every), "--keep", str(tc.keep),
         "--seed", str(cfg.seed), "--out", str(st / "run")] + (["--augment"] if cfg.augment else [])
        + (["--stop-at", str(done)] if done < steps else []),
        ["igpt", "eval", "--checkpoint", ckpt, "--data", str(st / "shards")],
        ["igpt", "probe", "--checkpoint", ckpt, "--data", str(st / "shards"), "--max-iter",
         str(PROBE_MAX_ITER), "--concat", str(PROBE_CONCAT), "--out", str(st / "probe")],
        ["igpt", "sample", "--checkpoint", ckpt, "--complete-from", str(st / "shards"), "--n",
         str(cfg.completions * cfg.per_image), "--per-image", str(cfg.per_image), "--seed", str(cfg.seed),
         "--out", str(st / "completions.png")],
        ["igpt", "sample", "--checkpoint", ckpt, "--n", str(cfg.samples), "--seed", str(sample_seed(cfg.seed)),
         "--out", str(st / "samples.png")],
    ]
    if cfg.device:
        demo += ["--device", cfg.device]
        stages = [c + ["--device", cfg.device] if c[1] in ("train", "eval", "probe", "sample") else c for c in stages]

    def join(c: list[str]) -> str:  # a path value that starts with '-' as --flag=VALUE (argparse reads it as a flag)
        args: list[str] = []
        for a in c:
            if args and args[-1] in PATH_FLAGS and a.startswith("-"):
                args[-1] += "=" + a
            else:
                args.append(a)
        return " ".join(q(a) for a in args)

    return [join(c) for c in [demo, *stages]]


def check_data(cfg: DemoConfig, labelled: bool, counts: dict[str, int]) -> None:
    """IgptError unless the data has labels, images in train, val and test, and enough test images for the
    completions (checked before an old demo is removed, and again after prepare)."""
    if not labelled:
        raise IgptError(f"{cfg.data}: the demo's probe needs class labels (class folders, IDX labels, CIFAR)")
    empty = [s for s in ("train", "val", "test") if not counts.get(s)]
    if empty:
        sizes = ", ".join(f"{s} {n}" for s, n in counts.items())
        raise IgptError(f"{cfg.data}: too few images for the demo's splits ({sizes}; empty: {', '.join(empty)}); "
                        "the probe needs images in train, val and test")
    if cfg.completions > counts["test"]:
        raise IgptError(f"{cfg.data}: {counts['test']} test images, fewer than the {cfg.completions} completions "
                        "asked for")


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; write OUT/summary.json and OUT/report.html; return the summary. An old demo in OUT is
    moved aside, not deleted, until this run has succeeded: a run that fails or is refused after the checks
    that need no data (labels found by prepare, a palette the data cannot fill, Ctrl-C) puts it back."""
    with output_lock(cfg.out):  # before an old demo there is moved aside
        aside: list[Path] = []
        try:
            summary = _run_demo(cfg, aside)
        except BaseException:
            if aside:
                real = Path(cfg.out).resolve()
                shutil.rmtree(real, ignore_errors=True)  # this run's partial output
                os.rename(aside[0], real)
            raise
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)
        return summary


def check_classes(cfg: DemoConfig, shards) -> None:
    """The probe's own label checks, made before training rather than after it: a test class unseen in train
    and val (igpt.shards.class_count), and train labels of a single class (check_two_classes)."""
    from igpt.shards import check_two_classes, class_count

    y = {s: np.asarray(shards.labels(s)).astype(np.int64) for s in ("train", "val", "test")}
    class_count(y, shards.meta.get("class_names"), cfg.data)
    check_two_classes(y["train"], cfg.data, "the demo's probe")


def _run_demo(cfg: DemoConfig, aside: list[Path]) -> dict:
    from igpt.checkpoint import load_model, save_model
    from igpt.datasets import open_source
    from igpt.distributed import get_dist_info, pick_device
    from igpt.evaluate import nll
    from igpt.prepare import PrepareConfig, check_fit_size, planned_counts, prepare
    from igpt.presets import get_preset
    from igpt.probe import ProbeConfig, run_probe
    from igpt.report import write_report
    from igpt.sample import sample_to_grid
    from igpt.shards import load_shards
    from igpt.train import check_fits_memory, train
    from igpt.train_log import read_metrics

    t0 = time.perf_counter()
    budget = cfg.minutes * 60
    out = Path(cfg.out)
    check_replaceable(out, {MARKER: is_demo_record})
    device = pick_device(cfg.device, get_dist_info())
    src = open_source(cfg.data, cfg.data_dir)  # a bad --data or --device must not cost the old demo
    k = cfg.palette_size or (16 if src.channels == 1 else 64)
    prep = PrepareConfig(out=str(out / "shards"), data=cfg.data, data_dir=cfg.data_dir, n_px=cfg.n_px,
                         palette_size=k, seed=cfg.seed, test_fraction=0.0 if "test" in src.splits else 0.1)
    # labels and split sizes are known without decoding: checked before an old demo goes
    check_data(cfg, all(sp.labelled for sp in src.splits.values()), planned_counts(src, prep))
    check_fit_size(k, src.channels, prep.fit_pixels)  # prepare's own refusal, made before the old demo is moved
    mcfg = get_preset(cfg.preset, n_px=cfg.n_px, palette_size=k)
    check_fits_memory(mcfg, cfg.batch_size)  # step_seconds allocates a batch: a traceback past the memory
    if out.exists():  # an old demo (it holds our marker): start clean. A symlinked --out: the folder it names
        real = out.resolve()  # is replaced, as for every --out (rmtree refused the link itself)
        old = real.with_name(f".{real.name}.previous-demo")  # kept until this run succeeds (run_demo)
        if old.exists() or old.is_symlink():  # one a killed run left: ours (refused otherwise)
            check_replaceable(old, {MARKER: is_demo_record})
            shutil.rmtree(old)
        os.rename(real, old)
        aside.append(old)
    out.resolve().mkdir(parents=True)
    atomic_write_bytes(out / MARKER, (json.dumps({"config": asdict(cfg)}, indent=2) + "\n").encode())
    timings: dict[str, float] = {}

    # 1. token shards
    t = time.perf_counter()
    _say(1, f"prepare: {cfg.data} -> {cfg.n_px}x{cfg.n_px} token shards")
    meta = prepare(prep)
    shards = load_shards(out / "shards")
    counts = meta["counts"]
    check_data(cfg, meta["labels"], counts)  # again with what was written (--skip-bad is not used here)
    check_classes(cfg, shards)  # labels the probe would refuse after training
    timings["prepare"] = time.perf_counter() - t
    print(f"      {', '.join(f'{s} {n}' for s, n in counts.items())} images, {k} colours "
          f"({timings['prepare']:.1f} s)", flush=True)

    # 2. pretraining, sized to the budget
    t = time.perf_counter()
    step_s, fwd_s = step_seconds(mcfg, cfg.batch_size, cfg.lr, device)
    n_img = sum(counts.values())
    plan = plan_steps(budget - (time.perf_counter() - t0), step_s, fwd_s, cfg.batch_size,
                      counts["val"] + counts["test"], n_img,
                      cfg.completions * cfg.per_image * mcfg.seq_len // 2 + cfg.samples * mcfg.seq_len,
                      cfg.max_steps, n_fit_sets=mcfg.n_layer + 1 + 3)  # the layers, a concatenation, 2 baselines
    if not cfg.steps and plan["minimum"]:
        print(f"      note: --minutes {cfg.minutes:g} is less than this run needs: the stages after training are "
              f"estimated at {plan['later_s']:.0f} s; training takes its minimum of {plan['steps']} steps, with no "
              "time limit", flush=True)
    steps = plan["steps"] = cfg.steps or plan["steps"]
    time_limit = None if cfg.steps else plan["time_limit_s"]  # fixed --steps: train them all (or to --stop-at)
    plan["time_limit_s"] = time_limit  # what the loop was given (none with --steps)
    _say(2, f"train: {cfg.preset} ({mcfg.n_layer} layers, {mcfg.n_embd} wide), {steps} steps of "
            f"{cfg.batch_size} images (measured {step_s * 1000:.0f} ms/step; "
            f"{plan['reserved_s']:.0f} s kept for the later stages"
            + ("" if time_limit is None else f"; stops early after {time_limit:.0f} s if the loop runs slower") + ")")
    tcfg = _train_config(cfg, out / "shards", out / "run", steps, time_limit)
    res = train(tcfg)
    done = res["step"]  # < steps when the loop ran slower than measured and hit the time limit (or --stop-at)
    ckpt = Path(res["checkpoint"])
    model_dir = out / "model"  # the model files alone (the optimizer state stays in run/checkpoints)
    model, palette = load_model(ckpt, device)
    save_model(model_dir, model, palette)
    timings["train"] = time.perf_counter() - t
    rows = read_metrics(out / "run" / "metrics.jsonl")
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]

    # 3. likelihood
    t = time.perf_counter()
    model.eval()
    val_nats = nll(model, shards.tokens("val"), device=device)
    test_nats = nll(model, shards.tokens("test"), device=device)
    timings["eval"] = time.perf_counter() - t
    _say(3, f"eval: val {val_nats / math.log(2):.3f}, test {test_nats / math.log(2):.3f} bits per token")

    # 4. linear probes
    t = time.perf_counter()
    _say(4, f"probe: logistic regression on the pooled features of layers 0..{mcfg.n_layer}, and on raw pixels")
    pres = run_probe(ProbeConfig(checkpoint=str(model_dir), data=str(out / "shards"), out=str(out / "probe"),
                                 max_iter=PROBE_MAX_ITER, concat=PROBE_CONCAT, device=cfg.device))
    timings["probe"] = time.perf_counter() - t
    native = (f" ({100 * pres['baseline_native_test_accuracy']:.1f}% at the source's {pres['native_px']}x"
              f"{pres['native_px']})" if "native_px" in pres else "")
    cat = pres["concat"]
    print(f"      best layer {pres['best_layer']} (chosen on val): test accuracy {100 * pres['test_accuracy']:.1f}% "
          f"vs raw pixels {100 * pres['baseline_test_accuracy']:.1f}%{native}; layers {cat['layers'][0]}-"
          f"{cat['layers'][-1]} concatenated: {100 * cat['test_accuracy']:.1f}%", flush=True)
    stuck = pres.get("unconverged_fits")
    for w in pres["warnings"]:
        if stuck is None or w != stuck["warning"]:  # that one names --max-iter, which the demo does not take
            print(f"      warning: {w}", flush=True)
    if stuck is not None:
        print(f"      warning: {stuck['stopped']} of {stuck['fits']} logistic-regression fits stopped at the demo's cap "
              f"of {stuck['max_iter']} L-BFGS iterations before converging (C = "
              f"{', '.join(f'{c:g}' for c in stuck['Cs'])}); `igpt probe` runs them to 1000 (README)", flush=True)

    # 5. completions and samples
    t = time.perf_counter()
    _say(5, f"sample: {cfg.completions} test images completed from their top half, {cfg.samples} samples")
    n_comp = cfg.completions * cfg.per_image
    rows_known = cfg.n_px // 2
    comp = sample_to_grid(model_dir, n_comp, out / "completions.png", complete_from=out / "shards",
                          rows=rows_known, seed=cfg.seed, top_k=None, per_image=cfg.per_image,
                          device=str(device))
    originals = np.asarray(shards.tokens("test")[: cfg.completions]).repeat(cfg.per_image, 0)[:n_comp]
    known = rows_known * cfg.n_px
    top_kept = bool((comp[:, :known] == originals[:, :known]).all())
    if not top_kept:
        raise IgptError("completions changed the given top half: a bug in igpt.sample")
    sample_to_grid(model_dir, cfg.samples, out / "samples.png", seed=sample_seed(cfg.seed), device=str(device))
    timings["sample"] = time.perf_counter() - t

    # 6. summary and report
    wall = time.perf_counter() - t0
    summary = {
        "probe_test_accuracy": pres["test_accuracy"],
        "baseline_test_accuracy": pres["baseline_test_accuracy"],
        "best_layer": pres["best_layer"],
        "probe_val_accuracy": pres["val_accuracy"],
        "baseline_val_accuracy": pres["baseline_val_accuracy"],
        "baseline_native_test_accuracy": pres.get("baseline_native_test_accuracy"),
        "concat_probe_test_accuracy": cat["test_accuracy"], "concat_probe_val_accuracy": cat["val_accuracy"],
        "concat_layers": cat["layers"],
        "native_px": pres.get("native_px"),
        "baseline_input": pres["baseline_input"],
        "per_layer": pres["per_layer"],
        "wall_seconds": wall,
        "budget_seconds": budget,
        "stage_seconds": timings,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "val_bits_per_token": val_nats / math.log(2),
        "test_bits_per_token": test_nats / math.log(2),
        "val_nats_per_token": val_nats,
        "test_nats_per_token": test_nats,
        "accuracy_unit": "fraction in [0, 1]",
        "data": cfg.data, "source": meta["source"], "counts": counts, "n_px": cfg.n_px, "channels": meta["channels"],
        "palette_size": k, "class_names": meta.get("class_names"),
        "model": {"preset": cfg.preset, "n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd, "n_head": mcfg.n_head,
                  "params": model.num_params()},
        "steps": done, "steps_planned": steps, "stopped_by_time_limit": done < (cfg.stop_at or steps),
        "stop_at": cfg.stop_at,
        "batch_size": cfg.batch_size, "lr": cfg.lr, "augment": cfg.augment,
        "tokens_seen": done * cfg.batch_size * mcfg.seq_len,
        "tokens_per_s": statistics.median(tps) if tps else None,
        "plan": plan, "device": str(device), "torch": torch.__version__,
        "completions_keep_top_half": top_kept, "completion_rows_given": rows_known,
        "commands": commands(cfg, out, prep, steps, done),
        "files": {"report": REPORT, "loss_curve_data": "run/metrics.jsonl", "probe": "probe/probe.json",
                  "completions": "completions.png", "samples": "samples.png", "model": "model"},
    }
    _say(6, "report")
    summary["wall_seconds"] = time.perf_counter() - t0  # up to the report, which shows this very number
    write_report(out, summary, rows, palette.colours())
    atomic_write_bytes(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    print(f"done in {summary['wall_seconds']:.0f} s: best layer {summary['best_layer']} probe "
          f"{100 * summary['probe_test_accuracy']:.1f}% vs raw pixels {100 * summary['baseline_test_accuracy']:.1f}%"
          f", val {summary['val_bits_per_token']:.3f} bits/token", flush=True)
    print(f"report: {(out / REPORT).resolve()}", flush=True)
    return summary
