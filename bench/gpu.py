"""GPU training-step throughput: igpt against transformers ImageGPT on one CUDA device; prints JSON.

Model FLOP utilisation uses 6·N + 12·L·T·d FLOPs per token (N = non-embedding parameters; forward + backward)
against the device's dense bf16 peak given by --peak-tflops (H100 SXM: 989).
Usage: python bench/gpu_train.py [--preset igpt-s] [--batch 16] [--steps 10] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import flops_per_token

from igpt.model import ImageGPT, ar_inputs, ar_loss
from igpt.presets import get_preset


def step_time(model, x, sos_id, steps, dtype, hf=False):
    """Median seconds of one forward + backward + AdamW step at batch x (B, T)."""
    cuda = x.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    inp = ar_inputs(x, sos_id)
    times = []
    for i in range(steps + 3):
        sync()
        t = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(inp).logits if hf else model(inp)  # HF's head also has palette_size outputs
            loss = ar_loss(logits, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="igpt-s")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--device", default="cuda", help="cuda (the point); cpu only to check the script runs")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = get_preset(args.preset)
    T, L, d = cfg.seq_len, cfg.n_layer, cfg.n_embd
    x = torch.randint(0, cfg.palette_size, (args.batch, T), device=args.device)
    cuda = args.device == "cuda"
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "preset": args.preset,
           "batch": args.batch, "seq_len": T}
    ours = ImageGPT(cfg).to(args.device)
    flops_tok, _ = flops_per_token(ours)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32_tf32", torch.float32)):
        s = step_time(ours, x, cfg.sos_id, args.steps, dtype)
        tok = args.batch * T / s
        out[f"igpt_{name}"] = {"step_s": round(s, 4), "tokens_per_s": round(tok),
                               "mfu_vs_bf16_peak": round(tok * flops_tok / (args.peak_tflops * 1e12), 3)}
    out["igpt_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    del ours
    if cuda:
        torch.cuda.empty_cache()
    try:
        from transformers import ImageGPTConfig as HFConfig
        from transformers import ImageGPTForCausalImageModeling

        hcfg = HFConfig(vocab_size=cfg.vocab_size, n_positions=T, n_embd=d, n_layer=L, n_head=cfg.n_head,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        ref = ImageGPTForCausalImageModeling(hcfg).to(args.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        s = step_time(ref, x, cfg.sos_id, args.steps, torch.bfloat16, hf=True)
        out["transformers_bf16"] = {"step_s": round(s, 4), "tokens_per_s": round(args.batch * T / s),
                                    "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        out["speedup_bf16"] = round(out["igpt_bf16"]["tokens_per_s"] / out["transformers_bf16"]["tokens_per_s"], 2)
    except Exception as e:  # the reference is optional here; report why it did not run
        out["transformers_bf16"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
