"""Issue 7's GPU suite on one CUDA device: igpt against transformers ImageGPT; prints one JSON object.

  python bench/gpu.py [--preset igpt-s] [--out FILE]        # ~3 min on one H100
  python bench/gpu.py --device cpu --preset tiny --quick     # checks that the script runs (no GPU numbers)

- matmul_peak: the card's practical bf16 (and TF32) matmul rate: median TFLOP/s of torch.matmul on random
  (8192, 8192) @ (8192, 8192) operands (2 n^3 FLOPs) after warm-up. MFU divides by this measured bf16 peak.
- train: forward + backward + fused AdamW step on random ids, median of --steps timed steps after 3 warm-ups
  (CUDA-synchronised host clock), dropout 0 on both sides, same shapes, batch and dtype. Ours in bf16 autocast
  eager and with torch.compile per block (igpt.distributed.wrap_model, as ``igpt train --compile``), at batch
  16 and 64, and in fp32 (TF32 matmuls); transformers' ImageGPTForCausalImageModeling in bf16 autocast at
  batch 16 (and 32, which may run out of memory: recorded). Model FLOPs per token 6 N + 12 L T d
  (common.flops_per_token); peak memory = torch.cuda.max_memory_allocated of the case.
- sample: completion of the bottom half of T-token images (top-k 40, same weights, fp32 with TF32 matmuls)
  at batch 8 and 64; ours igpt.sample.generate (plain, and with cuda_graph=True: each decode step one replayed
  CUDA graph) against generate(do_sample=True, top_k=40, use_cache=True),
  interleaved A B, B A; median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from common import flops_per_token

from igpt.distributed import wrap_model
from igpt.model import ImageGPT, ar_inputs, ar_loss
from igpt.presets import get_preset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def matmul_peak(device: torch.device, n: int, reps: int) -> dict:
    """Median TFLOP/s of (n, n) @ (n, n) on random data, bf16 and fp32 (TF32 allowed)."""
    out = {"method": f"median of {reps} torch.matmul ({n}, {n}) @ ({n}, {n}) on random data, 2 n^3 FLOPs"}
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        ts = []
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            torch.matmul(a, b, out=c)
            sync(device)
            ts.append(time.perf_counter() - t)
        # 3 significant figures, not a fixed 0.1: a CPU smoke run's emulated bf16 (~0.03 TFLOP/s) rounded to 0.0
        out[f"{name}_tflops"] = float(f"{2 * n**3 / statistics.median(ts) / 1e12:.3g}")
        del a, b, c
    return out


def step_time(model, x: torch.Tensor, sos_id: int, steps: int, dtype: torch.dtype, hf: bool = False) -> float:
    """Median seconds of one forward + backward + AdamW step at batch x (B, T)."""
    dev = x.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=dev.type == "cuda")
    inp = ar_inputs(x, sos_id)
    times = []
    for i in range(steps + 3):
        sync(dev)
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(inp).logits if hf else model(inp)
            loss = ar_loss(logits, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_reference(cfg):
    from transformers import ImageGPTConfig as HFConfig
    from transformers import ImageGPTForCausalImageModeling

    hcfg = HFConfig(vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return ImageGPTForCausalImageModeling(hcfg)


def train_case(cfg, impl: str, batch: int, dtype: torch.dtype, compiled: bool, steps: int, device, peaks):
    """One training configuration in a fresh model: tokens/s, MFU against the measured matmul peak of the same
    dtype (bf16, or TF32 for the fp32 rows; ``peaks`` {'bf16': TFLOP/s, 'tf32': TFLOP/s} or None), memory."""
    peak_tflops = peaks and peaks["bf16" if dtype == torch.bfloat16 else "tf32"]
    reset_memory(device)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.palette_size, (batch, cfg.seq_len), device=device)
    row = {"impl": impl, "batch": batch, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32_tf32",
           "compiled": compiled}
    try:
        if impl == "igpt":
            if compiled:
                torch._dynamo.reset()  # a static graph for this batch, as a training run compiles it
            model = ImageGPT(cfg).to(device)
            flops_tok, _ = flops_per_token(model)
            t = time.perf_counter()
            model = wrap_model(model, device, compile=compiled)
            s = step_time(model, x, cfg.sos_id, steps, dtype)
            if compiled:
                row["first_steps_s"] = round(time.perf_counter() - t - (steps * s), 1)  # compile + warm-up
        else:
            model = hf_reference(cfg).to(device)
            flops_tok, _ = flops_per_token(ImageGPT(cfg))  # the same network: the same model FLOPs
            s = step_time(model, x, cfg.sos_id, steps, dtype, hf=True)
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"OutOfMemoryError: {str(e).splitlines()[0][:160]}"
        return row
    finally:
        model = None
    tok = batch * cfg.seq_len / s
    row.update(step_s=round(s, 4), tokens_per_s=round(tok), tflops=round(tok * flops_tok / 1e12, 1),
               mfu=float(f"{tok * flops_tok / (peak_tflops * 1e12):.3g}") if peak_tflops else None,  # 3 figures: tiny CPU runs too
               peak_memory_gb=peak_memory_gb(device))
    print(f"# train {row}", file=sys.stderr)
    return row


def sample_case(cfg, batch: int, repeats: int, device) -> dict:
    """Images/s completing the bottom half of each image, ours against transformers' generate."""
    from transformers.utils import logging as hf_logging

    from igpt.hf import hf_state_to_ours
    from igpt.sample import generate

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    ref = hf_reference(cfg).to(device).eval()
    with torch.no_grad():
        ref.lm_head.weight.normal_(0, 0.02)  # a non-trivial output distribution
    ours = ImageGPT(cfg).to(device).eval()
    ours.load_state_dict(hf_state_to_ours(ref.state_dict(), "bench")[0])
    T, P = cfg.seq_len, cfg.seq_len // 2
    prefix = torch.randint(0, cfg.palette_size, (batch, P))
    ctx = torch.cat([torch.full((batch, 1), cfg.sos_id), prefix], 1).to(device)

    def run_ours(cuda_graph=False):
        out = generate(ours, batch, prefix=prefix, top_k=40, seed=0, batch_size=batch, cuda_graph=cuda_graph)
        sync(device)
        return out

    def run_ref():
        with torch.no_grad():
            out = ref.generate(input_ids=ctx, max_length=T + 1, do_sample=True, top_k=40, use_cache=True)
        sync(device)
        return out

    impls = {"igpt": run_ours, "igpt_cuda_graph": lambda: run_ours(True), "transformers": run_ref}
    assert run_ours().shape == (batch, T) and run_ref().shape == (batch, T + 1)  # warm-up, same length
    graph_error = None
    try:  # not yet run on a GPU when written: a failure must not cost the other rows
        assert run_ours(True).shape == (batch, T)
    except Exception as e:  # noqa: BLE001
        graph_error = f"{type(e).__name__}: {e}"[:300]
        del impls["igpt_cuda_graph"]
    times = {k: [] for k in impls}
    for r in range(repeats):
        for name in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
            t = time.perf_counter()
            impls[name]()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"batch": batch, "known_tokens": P, "sampled_tokens": T - P,
           **{k: {"images_s": round(batch / med[k], 2), "seconds_runs": [round(x, 3) for x in v]}
              for k, v in times.items()},
           "ratio": round(med["transformers"] / med["igpt"], 2)}
    if graph_error is None:
        row["ratio_cuda_graph"] = round(med["transformers"] / med["igpt_cuda_graph"], 2)
    else:
        row["cuda_graph_error"] = graph_error
    print(f"# sample {row}", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="igpt-s")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per case")
    ap.add_argument("--repeats", type=int, default=2, help="sampling runs per side")
    ap.add_argument("--device", default="cuda", help="cuda (the point); cpu only to check that the script runs")
    ap.add_argument("--quick", action="store_true", help="batch 2 and 4, small matmuls, no compile: a smoke run")
    ap.add_argument("--only", default="matmul,train,sample", help="comma-separated parts")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = get_preset(args.preset)
    parts = set(args.only.split(","))
    small, big = (2, 4) if args.quick else (16, 64)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "preset": args.preset, "seq_len": cfg.seq_len, "n_layer": cfg.n_layer,
           "n_embd": cfg.n_embd, "flops_per_token": flops_per_token(ImageGPT(cfg))[0],
           "flops_formula": "6 N + 12 L T d (N non-embedding parameters, head included)"}
    try:
        import transformers

        res["transformers"] = transformers.__version__
    except ImportError:
        res["transformers"] = None
    peak = None

    def save() -> None:  # after every part, so a run stopped part-way keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(res, indent=2) + "\n")

    if "matmul" in parts:
        res["matmul_peak"] = matmul_peak(device, 1024 if args.quick else 8192, 3 if args.quick else 20)
        peak = {k: res["matmul_peak"][f"{k}_tflops"] for k in ("bf16", "tf32")}
        save()
    bf16, fp32 = torch.bfloat16, torch.float32
    rows = []
    if "train" in parts:  # eager cases first; the compiled ones (minutes of compilation) after sampling
        for c in [("igpt", small, bf16, False), ("transformers", small, bf16, False), ("igpt", small, fp32, False),
                  ("igpt", big, bf16, False), ("transformers", 2 * small, bf16, False)]:
            rows.append(train_case(cfg, *c, args.steps, device, peak))
        summarise(res, rows, small, peak)
        save()
    if "sample" in parts:
        res["sample"] = [sample_case(cfg, b, args.repeats, device) for b in ((2,) if args.quick else (8, 64))]
        save()
    if "train" in parts and not args.quick:
        for c in [("igpt", small, bf16, True), ("igpt", big, bf16, True)]:
            rows.append(train_case(cfg, *c, args.steps, device, peak))
            summarise(res, rows, small, peak)
            save()
    print(json.dumps(res, indent=2))


def summarise(res: dict, rows: list[dict], small: int, peak: float | None) -> None:
    """res['train'] = rows; the bf16 ratio to the reference at the small batch; the best MFU of ours."""
    res["train"] = rows
    ok = [r for r in rows if "tokens_per_s" in r]
    ours_small = [r for r in ok if r["impl"] == "igpt" and r["batch"] == small and r["dtype"] == "bf16"]
    ref_small = [r for r in ok if r["impl"] == "transformers" and r["batch"] == small]
    if ours_small and ref_small:
        best = max(ours_small, key=lambda r: r["tokens_per_s"])
        mem = best["peak_memory_gb"] and round(best["peak_memory_gb"] / ref_small[0]["peak_memory_gb"], 3)
        eager = [r for r in ours_small if not r["compiled"]]  # like for like: the reference runs eager
        res["train_ratio_bf16"] = {"batch": small, "compiled": best["compiled"],
                                   "ratio": best["tokens_per_s"] / ref_small[0]["tokens_per_s"],
                                   "ratio_eager": eager[0]["tokens_per_s"] / ref_small[0]["tokens_per_s"]
                                   if eager else None,
                                   "memory_ratio": mem}
    ours = [r for r in ok if r["impl"] == "igpt" and r["dtype"] == "bf16" and r["mfu"] is not None]
    if ours:
        res["best_mfu"] = max(ours, key=lambda r: r["mfu"])


if __name__ == "__main__":
    main()
