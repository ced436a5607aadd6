"""The whole performance suite in one command; prints one JSON object with one key per case.

  .venv/bin/python bench/run.py                    # everything (about 15 minutes on 2 cores)
  .venv/bin/python bench/run.py --quick            # 1 round, fewer steps and smaller data (a smoke run)
  .venv/bin/python bench/run.py --only train_t16,sample_t16_b8
  .venv/bin/python bench/run.py --markdown result.json   # render the README table from a saved result

Every case holds the figures of ours and of the reference under "ours" and "reference", "ratio" (ours over
the reference, higher is better: a throughput ratio, or the reference's seconds over ours) and "others_cores"
(CPU cores other processes took while it ran; see bench/common.py). Training cases add "memory_ratio" (ours /
reference peak memory above the post-import baseline, lower is better) and "mfu" (model FLOP utilisation
against "matmul_peak" of the same dtype, measured in the same run, so any training case adds that case too;
formula in bench/common.py's flops_per_token).

Cases:
  matmul_peak      practical torch.matmul peak, fp32 and bf16 (bench_matmul.py)
  train_s32        fwd + bwd + AdamW, n_embd 256, 8 layers, 8 heads, 32x32 (T 1024), batch 8, fp32
  train_t16        the same at n_embd 128, 4 layers, 4 heads, 16x16 (T 256), batch 32, fp32
  train_s32_bf16   train_s32 under torch.autocast(bfloat16) on both sides
  sample_t16_b8    t16 model completes the bottom half of 16x16 images, batch 8 (top-k 40)
  sample_t16_b64   the same at batch 64
  sample_s32_b8    s32 model samples whole 32x32 images, batch 8
  quantize         32x32 RGB images -> palette ids, against transformers' ImageGPT image processor
  palette_fit      512-colour palette on 1M pixels, against sklearn MiniBatchKMeans (time and inertia)
  probe_fit        logistic-regression probe, against sklearn LogisticRegression(lbfgs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import bench_model as bm

CASES = ("matmul_peak", "train_s32", "train_t16", "train_s32_bf16", "sample_t16_b8", "sample_t16_b64",
         "sample_s32_b8", "quantize", "palette_fit", "probe_fit")
TRAIN_CASES = {"train_s32": ("s32", "fp32"), "train_t16": ("t16", "fp32"), "train_s32_bf16": ("s32", "bf16")}
SAMPLE_CASES = {"sample_t16_b8": ("t16", 8, 8), "sample_t16_b64": ("t16", 8, 64), "sample_s32_b8": ("s32", 0, 8)}


def run_case(name: str, quick: bool, peak: dict | None, compile: bool = False) -> dict:
    repeats = 1 if quick else 3
    if name == "matmul_peak":
        from bench_matmul import matmul_peak

        return matmul_peak(quick)
    if name in TRAIN_CASES:
        cfg, dtype = TRAIN_CASES[name]
        steps = 2 if quick else bm.STEPS[cfg]
        return bm.train_case(cfg, dtype, repeats, steps, peak[dtype]["gflops"] if peak else None, compile)
    if name in SAMPLE_CASES:
        cfg, rows, batch = SAMPLE_CASES[name]
        return bm.sample_case(cfg, rows, batch, repeats)
    if name == "quantize":
        from bench_palette import quantize_case

        return quantize_case(quick)
    if name == "palette_fit":
        from bench_palette import palette_fit_case

        return palette_fit_case(quick)
    from bench_probe import probe_fit_case

    return probe_fit_case(quick)


def run(names: list[str], quick: bool, compile: bool = False) -> dict:
    import torch
    import transformers

    res = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "python": platform.python_version(),
                       "cpu": cpu_name()},
           "quick": quick, "compile": compile, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t0, peak = time.perf_counter(), None
    if "matmul_peak" in names or any(n in TRAIN_CASES for n in names):  # MFU needs the peak of the same run
        peak = res["matmul_peak"] = run_case("matmul_peak", quick, None)
    for name in names:
        if name != "matmul_peak":
            print(f"# {name} ...", file=sys.stderr)
            try:
                res[name] = run_case(name, quick, peak, compile)
            except Exception as e:  # one failing case must not lose the rest of a long run
                res[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
                print(f"# {name} failed: {res[name]['error']}", file=sys.stderr)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "CONFIG", "STEPS", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 round, 2 training steps, smaller data")
    ap.add_argument("--only", help=f"comma-separated cases out of {', '.join(CASES)}")
    ap.add_argument("--compile", action="store_true",
                    help="training cases: ours with torch.compile per block (igpt train --compile)")
    ap.add_argument("--markdown", metavar="JSON", help="print the README table of a saved result and exit")
    a = ap.parse_args()
    if a.worker:
        impl, cfg, steps, dtype = a.worker
        print(json.dumps(bm.train_worker(impl, cfg, int(steps), dtype)))
        return
    if a.markdown:
        from README_table import markdown

        with open(a.markdown) as f:
            print(markdown(json.load(f)))
        return
    names = list(CASES) if a.only is None else [n.strip() for n in a.only.split(",") if n.strip()]
    if not names:  # `--only ""` ran the whole suite (10-20 minutes) and `--only ,` nothing
        ap.error(f"--only: no case named; choose from {', '.join(CASES)}")
    bad = [n for n in names if n not in CASES]
    if bad:
        ap.error(f"--only: unknown case(s) {bad}; choose from {', '.join(CASES)}")
    print(json.dumps(run(names, a.quick, a.compile), indent=2))


if __name__ == "__main__":
    main()
