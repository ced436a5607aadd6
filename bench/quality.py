"""Issue 5's quality targets: pretrain on full Fashion-MNIST within a wall-time budget, then the probe protocol.

  .venv/bin/python bench/quality.py --data-dir ../shared/data --minutes 60 --out runs/quality
  .venv/bin/python bench/quality.py --data fashion-mnist-mini --steps 3 --preset tiny --n-px 8 --out /tmp/q  # smoke

Stages (each the library's own entry point):
1. ``igpt prepare``: 60,000 train (10% held out as val) and 10,000 test images at --n-px with a --palette-size
   grey palette; the shards keep the images before quantization at n_px and at the native 28x28 for the
   raw-pixel baselines. An existing OUT/shards made with the same settings is reused.
2. one training step is measured (igpt.budget.step_seconds) and the step count set so that pretraining fits
   --minutes (with the train loop's overhead); --steps fixes it instead. With --minutes the loop also stops
   (checkpointing) once it has run that long (TrainConfig.time_limit; the schedule stays that of the planned
   steps). ``igpt train`` resumes from OUT/run when a previous attempt was interrupted (a resumed attempt gets
   the whole --minutes again).
3. test NLL (bits per token); 4. ``igpt probe``: every layer, layer and C chosen on val, test accuracy of the
   refit on train + val, the raw-pixel baselines (n_px and native), and the low-data protocol (10 labels per
   class, 5 seeds, the same draws for the baselines).

Prints one JSON object (also OUT/quality.json): the recipe (model, steps, batch, lr, seconds, tokens/s, device,
CPU), the results, and each of the issue's targets with the measured value and whether it is met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

# wall time of a training-loop step over the measured bare step (validation passes, logging, checkpoints):
# 1.13 measured on the one-hour 16x16 run, so 1.2 keeps pretraining inside --minutes
LOOP_OVERHEAD = 1.2
TARGETS = {  # issue 5: the best-layer probe must beat raw pixels clearly
    "probe_all_labels": 0.90,
    "probe_10_per_class": 0.80,
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shards_for(args) -> Path:
    from igpt.io import read_json
    from igpt.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(out=str(Path(args.out) / "shards"), data=args.data, data_dir=args.data_dir, n_px=args.n_px,
                        palette_size=args.palette_size, seed=args.seed)
    meta_path = Path(cfg.out) / "meta.json"
    if meta_path.is_file():
        old = read_json(meta_path).get("config", {})
        if all(old.get(k) == getattr(cfg, k) for k in ("data", "n_px", "palette_size", "seed", "val_fraction")):
            return Path(cfg.out)
    prepare(cfg)
    return Path(cfg.out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion-mnist", help="any labelled source `igpt prepare` reads")
    p.add_argument("--data-dir", help="folder holding the named data sets (e.g. ../shared/data)")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--minutes", type=float, default=60.0, help="pretraining wall-time budget (default 60)")
    p.add_argument("--steps", type=int, help="fix the step count instead of deriving it from --minutes")
    p.add_argument("--n-px", type=int, default=16)
    p.add_argument("--palette-size", type=int, default=16)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--n-layer", type=int, help="override the preset's depth")
    p.add_argument("--n-embd", type=int, help="override the preset's width")
    p.add_argument("--n-head", type=int, help="override the preset's head count")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--augment", action="store_true", help="random crop + flip during pretraining")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (pays off on a GPU)")
    p.add_argument("--eval-images", type=int, default=1000, help="val images per validation during pretraining")
    p.add_argument("--probe-batch-size", type=int, default=64, help="images per feature-extraction pass")
    p.add_argument("--labels-per-class", default="10", help="low-data K values, comma-separated")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from igpt.budget import step_seconds
    from igpt.checkpoint import load_model
    from igpt.distributed import get_dist_info, pick_device
    from igpt.errors import IgptError
    from igpt.evaluate import nll
    from igpt.io import atomic_write_bytes, read_json
    from igpt.presets import get_preset
    from igpt.probe import ProbeConfig, run_probe
    from igpt.shards import load_shards
    from igpt.train import train
    from igpt.train_config import TrainConfig
    from igpt.train_log import read_metrics

    try:
        with contextlib.redirect_stdout(sys.stderr):  # progress lines to stderr: stdout is the JSON alone
            t0 = time.perf_counter()
            out = Path(args.out)
            shards_dir = shards_for(args)
            shards = load_shards(shards_dir)
            t_prep = time.perf_counter() - t0
            overrides = {k: v for k, v in (("n_layer", args.n_layer), ("n_embd", args.n_embd), ("n_head", args.n_head))
                         if v is not None}
            mcfg = get_preset(args.preset, n_px=shards.n_px, palette_size=shards.palette.k, **overrides)
            device = pick_device(None, get_dist_info())
            step_s, _ = step_seconds(mcfg, args.batch_size, args.lr, device, compile=args.compile)
            steps = args.steps or max(1, int(args.minutes * 60 / (LOOP_OVERHEAD * step_s)))
            saved = out / "run" / "config.json"
            resumed = any((out / "run" / "checkpoints").glob("step-*"))
            if resumed and not args.steps and saved.is_file():  # an interrupted attempt: keep its schedule
                steps = int(read_json(saved)["train"]["steps"])
            tcfg = TrainConfig(data=str(shards_dir), preset=args.preset, model_overrides=overrides, out=str(out / "run"),
                               steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=max(1, steps // 20),
                               augment=args.augment, eval_every=max(1, steps // 10), eval_images=args.eval_images,
                               save_every=max(1, steps // 20), keep=2, seed=args.seed, resume="auto",
                               compile=args.compile, time_limit=None if args.steps else args.minutes * 60)
            t = time.perf_counter()
            res = train(tcfg)
            t_train = time.perf_counter() - t
            ckpt = res["checkpoint"]
            model, _ = load_model(ckpt, device)
            model.eval()
            test_nats = nll(model, shards.tokens("test"), device=device)
            t = time.perf_counter()
            ks = tuple(int(k) for k in args.labels_per_class.split(","))
            pres = run_probe(ProbeConfig(checkpoint=str(ckpt), data=str(shards_dir), out=str(out / "probe"),
                                         labels_per_class=ks, seeds=args.seeds, cache=True,
                                         batch_size=args.probe_batch_size))
            t_probe = time.perf_counter() - t
    except IgptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    rows = read_metrics(out / "run" / "metrics.jsonl")
    tps = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    low = {r["labels_per_class"]: r for r in pres.get("low_data", [])}
    ten = low.get(10)
    measured = {"probe_all_labels": pres["test_accuracy"], "probe_10_per_class": ten and ten["mean"]}
    result = {
        "recipe": {
            "data": args.data, "counts": shards.meta["counts"], "n_px": shards.n_px, "palette_size": shards.palette.k,
            "model": {"preset": args.preset, **overrides, "n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd,
                      "n_head": mcfg.n_head, "params": model.num_params()},
            "steps": res["step"], "steps_planned": steps, "batch_size": args.batch_size, "lr": args.lr,
            "augment": args.augment, "stopped_by_time_limit": res["step"] < steps,
            "images_seen": res["step"] * args.batch_size, "compile": args.compile,
            "epochs": res["step"] * args.batch_size / shards.meta["counts"]["train"],
            "budget_minutes": None if args.steps else args.minutes, "measured_step_s": step_s,
            "train_seconds": t_train, "tokens_per_s_median": statistics.median(tps) if tps else None,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "resumed": resumed,
        },
        "test_bits_per_token": test_nats / math.log(2), "test_nats_per_token": test_nats,
        "best_layer": pres["best_layer"], "per_layer": pres["per_layer"],
        "probe_test_accuracy": pres["test_accuracy"], "probe_val_accuracy": pres["val_accuracy"],
        "baseline_test_accuracy": pres["baseline_test_accuracy"], "baseline_input": pres["baseline_input"],
        "baseline_native_test_accuracy": pres.get("baseline_native_test_accuracy"), "native_px": pres.get("native_px"),
        "low_data": pres.get("low_data", []),
        "targets": [{"name": k, "target": v, "measured": measured[k],
                     "met": measured[k] is not None and measured[k] >= v} for k, v in TARGETS.items()],
        "seconds": {"prepare": t_prep, "train": t_train, "probe": t_probe, "total": time.perf_counter() - t0},
        "accuracy_unit": "fraction in [0, 1]",
    }
    text = json.dumps(result, indent=2)
    atomic_write_bytes(out / "quality.json", (text + "\n").encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
