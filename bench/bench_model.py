"""Benchmark igpt's ImageGPT against transformers' ImageGPTForCausalImageModeling on this machine; prints JSON.

Training: forward + backward + AdamW step, fp32, dropout 0 on both, cross-entropy over every pixel.
  s32: n_embd 256, 8 layers, 8 heads, 32x32 (T = 1024), batch 8;  t16: 128, 4 layers, 4 heads, 16x16, batch 32.
  Each run is a fresh subprocess (one implementation, one config): 1 warm-up step, then --steps timed steps
  (median). Runs alternate A B A B ... for --repeats rounds; the JSON gives the median over rounds.
  Peak memory = the subprocess's ru_maxrss (peak resident set, whole process). Both sides import torch and
  transformers before building anything, so "peak_rss_mb" compares like with like; "above_import_mb"
  subtracts the RSS measured right after those imports.
Sampling: batch 8, top-k 40 sampling, same weights on both sides; ours = igpt.sample.generate, theirs =
  generate(do_sample=True, top_k=40, use_cache=True) to the same length. Interleaved in one process.
  half16: the t16 model completes the bottom half of 16x16 images (128 known + 128 sampled tokens);
  full32: the s32 model samples all 1024 tokens of 32x32 images.
Contention: with 2 cores any other process distorts the numbers, and os.getloadavg() counts the benchmark's
  own threads too. So each run also records "others_cores": the CPU time the whole machine spent busy
  (/proc/stat) minus the benchmark's own CPU time, divided by the wall time (0 = nobody else; 1 = a whole
  core taken by others).

  python bench/bench_model.py                 # everything (about 8 minutes on 2 cores)
  python bench/bench_model.py --quick         # 1 round, 2 steps, both configs (about 2 minutes)
  python bench/bench_model.py --only sample --sample-configs half16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

TRAIN = {  # name: (n_px, n_embd, n_layer, n_head, batch)
    "s32": (32, 256, 8, 8, 8),
    "t16": (16, 128, 4, 4, 32),
}
SAMPLE = {  # name: (train config, known rows)
    "half16": ("t16", 8),
    "full32": ("s32", 0),
}
PALETTE = 512


def busy_s() -> float | None:
    """Seconds of CPU time the machine has spent busy (all cores, since boot), from /proc/stat; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class Contention:
    """CPU cores used by other processes during a `with` block (our process and its children excluded)."""

    def __enter__(self):
        self.t, self.busy = time.perf_counter(), busy_s()
        self.own = own_cpu_s(resource.RUSAGE_SELF) + own_cpu_s(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        own = own_cpu_s(resource.RUSAGE_SELF) + own_cpu_s(resource.RUSAGE_CHILDREN) - self.own
        end = busy_s()
        self.others = None if end is None else round(max(0.0, (end - self.busy - own) / wall), 3)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hf_model(n_px, d, L, H):
    import transformers

    cfg = transformers.ImageGPTConfig(vocab_size=PALETTE + 1, n_positions=n_px * n_px, n_embd=d, n_layer=L,
                                      n_head=H, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.ImageGPTForCausalImageModeling(cfg)


def our_model(n_px, d, L, H):
    from igpt.model import ImageGPT, ImageGPTConfig

    return ImageGPT(ImageGPTConfig(n_px=n_px, palette_size=PALETTE, n_embd=d, n_layer=L, n_head=H))


# -- training worker (runs in its own process) ----------------------------------------------------------------
def train_worker(impl: str, name: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers  # noqa: F401 - imported on both sides so the memory baselines agree

    import igpt.model as im

    base = rss_mb()
    n_px, d, L, H, B = TRAIN[name]
    torch.manual_seed(0)
    model = (our_model if impl == "igpt" else hf_model)(n_px, d, L, H).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, PALETTE, (B, n_px * n_px))
    inp = im.ar_inputs(x, PALETTE)

    def step():
        logits = model(inp) if impl == "igpt" else model(inp).logits
        loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"tok_s": B * n_px * n_px / med, "step_s": times, "peak_rss_mb": rss_mb(), "import_rss_mb": base}


def run_train(names, repeats, steps) -> dict:
    out = {}
    for name in names:
        runs = {"igpt": [], "transformers": []}
        for r in range(repeats):
            order = ("igpt", "transformers") if r % 2 == 0 else ("transformers", "igpt")
            for impl in order:
                la = os.getloadavg()
                with Contention() as c:
                    res = subprocess.run([sys.executable, __file__, "--worker", impl, name, str(steps)],
                                         capture_output=True, text=True, check=True)
                rec = json.loads(res.stdout.strip().splitlines()[-1])
                rec["loadavg_before"], rec["loadavg_after"], rec["others_cores"] = la, os.getloadavg(), c.others
                runs[impl].append(rec)
                print(f"# train {name} {impl}: {rec['tok_s']:.0f} tok/s, peak {rec['peak_rss_mb']:.0f} MB, "
                      f"load {la[0]:.2f}, others {c.others}", file=sys.stderr)
        summ = {}
        for impl, recs in runs.items():
            summ[impl] = {
                "tok_s_median": statistics.median(r["tok_s"] for r in recs),
                "tok_s_runs": [round(r["tok_s"], 1) for r in recs],
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in recs),
                "above_import_mb": statistics.median(r["peak_rss_mb"] - r["import_rss_mb"] for r in recs),
                "loadavg_1min": [round(r["loadavg_before"][0], 2) for r in recs],
                "others_cores": [r["others_cores"] for r in recs],
            }
        n_px, d, L, H, B = TRAIN[name]
        out[name] = {"shape": dict(n_px=n_px, n_embd=d, n_layer=L, n_head=H, batch=B), **summ,
                     "speedup": summ["igpt"]["tok_s_median"] / summ["transformers"]["tok_s_median"],
                     "memory_ratio": summ["igpt"]["peak_rss_mb"] / summ["transformers"]["peak_rss_mb"],
                     "memory_ratio_above_import": summ["igpt"]["above_import_mb"]
                     / summ["transformers"]["above_import_mb"]}
    return out


# -- sampling (in process) ------------------------------------------------------------------------------------
def run_sample(names, repeats, batch=8, top_k=40) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return {name: sample_one(name, repeats, batch, top_k) for name in names}


def sample_one(name, repeats, batch, top_k) -> dict:
    import torch

    from igpt.hf import hf_state_to_ours
    from igpt.sample import generate

    tname, rows = SAMPLE[name]
    n_px, d, L, H, _ = TRAIN[tname]
    T, P = n_px * n_px, rows * n_px
    torch.manual_seed(0)
    ref = hf_model(n_px, d, L, H).eval()
    with torch.no_grad():
        ref.lm_head.weight.normal_(0, 0.02)  # a non-trivial output distribution
    ours = our_model(n_px, d, L, H).eval()
    ours.load_state_dict(hf_state_to_ours(ref.state_dict(), "bench")[0])
    prefix = torch.randint(0, PALETTE, (batch, P))
    ctx = torch.cat([torch.full((batch, 1), PALETTE), prefix], 1)

    def run_ours():
        return generate(ours, batch, prefix=prefix if P else None, top_k=top_k, seed=0)

    def run_hf():
        with torch.no_grad():
            return ref.generate(input_ids=ctx, max_length=T + 1, do_sample=True, top_k=top_k, use_cache=True)

    impls = {"igpt": run_ours, "transformers": run_hf}
    assert run_ours().shape == (batch, T) and run_hf().shape == (batch, T + 1)  # warm-up, same length
    times = {"igpt": [], "transformers": []}
    loads, others = [], []
    for r in range(repeats):
        for impl in (("igpt", "transformers") if r % 2 == 0 else ("transformers", "igpt")):
            loads.append(round(os.getloadavg()[0], 2))
            t = time.perf_counter()
            with Contention() as c:
                impls[impl]()
            times[impl].append(time.perf_counter() - t)
            others.append(c.others)
            print(f"# sample {name} {impl}: {times[impl][-1]:.2f} s, load {loads[-1]}, others {c.others}",
                  file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": tname, "batch": batch, "known_tokens": P, "sampled_tokens": T - P, "top_k": top_k,
            **{k: {"images_s": batch / med[k], "seconds_runs": [round(x, 3) for x in v]} for k, v in times.items()},
            "speedup": med["transformers"] / med["igpt"], "loadavg_1min": loads, "others_cores": others}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "CONFIG", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["train", "sample"])
    ap.add_argument("--train-configs", default="s32,t16")
    ap.add_argument("--sample-configs", default="half16,full32")
    ap.add_argument("--repeats", type=int, default=3, help="A/B rounds (median over them)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per run (after 1 warm-up)")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 steps")
    a = ap.parse_args()
    if a.worker:
        impl, name, steps = a.worker
        print(json.dumps(train_worker(impl, name, int(steps))))
        return
    if a.quick:
        a.repeats, a.steps = 1, 2
    import torch
    import transformers

    res = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "python": platform.python_version()},
           "loadavg_start": os.getloadavg(), "dtype": "float32", "repeats": a.repeats,
           "memory_method": "ru_maxrss of one subprocess per run (peak RSS; both sides import torch+transformers)"}
    if a.only in (None, "train"):
        res["train"] = run_train(a.train_configs.split(","), a.repeats, a.steps)
    if a.only in (None, "sample"):
        res["sample"] = run_sample(a.sample_configs.split(","), a.repeats)
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
