"""Attention paths by length and dtype: why igpt.ops.attention picks what it picks. Prints one JSON object.

  .venv/bin/python bench/bench_attention.py [--quick] [--threads 2]

For each case (batch, 4 heads, head_dim 32, causal; forward + backward of a sum, median of timed repeats, the
three implementations interleaved A B C / C B A over rounds):
  igpt               igpt.ops.attention (the path it chooses for this dtype and length)
  flash              F.scaled_dot_product_attention (the fused CPU flash kernel)
  matmul_masked_fill 4-D matmul, scale, masked_fill of the upper triangle, softmax, matmul (the plain formulation)
Inputs are laid out as the model makes them: views of one (B, T, 3, H, hd) projection output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

CASES = {  # name: (batch, T, dtype)
    "t144_bf16": (16, 144, "bf16"),  # the demo: 12x12, batch 16
    "t256_bf16": (32, 256, "bf16"),  # t16's shapes
    "t256_fp32": (32, 256, "fp32"),
    "t1024_bf16": (8, 1024, "bf16"),  # s32's length, batch and head_dim (4 heads here, s32 has 8)
}
HEADS, HEAD_DIM = 4, 32


def masked_fill_attention(q, k, v):
    import torch

    T = q.shape[-2]
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu_(1), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round of 3 repeats (a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from igpt.ops import attention

    torch.set_num_threads(args.threads)
    impls = {
        "igpt": lambda q, k, v: attention(q, k, v, True),
        "flash": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "matmul_masked_fill": masked_fill_attention,
    }
    rounds, repeats = (1, 3) if args.quick else (4, 7)
    out = {}
    for case, (B, T, dt) in CASES.items():
        dtype = torch.bfloat16 if dt == "bf16" else torch.float32
        qkv = torch.randn(B, T, 3, HEADS, HEAD_DIM, dtype=dtype, requires_grad=True)
        times = {name: [] for name in impls}
        for r in range(rounds):
            for name in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
                ts = []
                for _ in range(repeats + 1):  # the first is a warm-up
                    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
                    t0 = time.perf_counter()
                    impls[name](q, k, v).float().sum().backward()
                    ts.append(time.perf_counter() - t0)
                    qkv.grad = None
                times[name].append(statistics.median(ts[1:]))
        ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
        out[case] = {"batch": B, "T": T, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": dt, "fwd_bwd_ms": ms,
                     "igpt_over_flash": ms["flash"] / ms["igpt"],
                     "igpt_over_matmul_masked_fill": ms["matmul_masked_fill"] / ms["igpt"]}
    out["threads"] = args.threads
    out["unit"] = "fwd_bwd_ms: milliseconds per forward + backward (median); *_over_*: speed ratio, > 1 = igpt faster"
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
