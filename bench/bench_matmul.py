"""Practical matmul peak of this machine: the best GFLOP/s of torch.matmul on square matrices, fp32 and bf16.

2 n^3 FLOPs per (n, n) @ (n, n); for each dtype the best time over ``reps`` runs at each size (after one
warm-up), and the best size wins. Training MFU divides by the peak of the same dtype from the same run.
"""

from __future__ import annotations

import time

from common import Contention

SIZES = (1024, 2048, 3072, 4096)
QUICK_SIZES = (1024, 2048)


def matmul_gflops(n: int, dtype, reps: int) -> float:
    """Best GFLOP/s of torch.matmul on (n, n) @ (n, n) in ``dtype`` over ``reps`` timed runs."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def matmul_peak(quick: bool = False) -> dict:
    """{'fp32': {'gflops', 'by_size'}, 'bf16': {...}, 'others_cores'}: both dtypes in the same run."""
    import torch

    sizes, reps = (QUICK_SIZES, 2) if quick else (SIZES, 4)
    out = {"method": f"best of {reps} torch.matmul (n, n) @ (n, n), 2 n^3 FLOPs, n in {list(sizes)}",
           "threads": torch.get_num_threads()}
    with Contention() as c:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            by = {str(n): round(matmul_gflops(n, dtype, reps), 1) for n in sizes}
            out[name] = {"gflops": max(by.values()), "by_size": by}
    out["others_cores"] = c.others
    out["seconds"] = round(c.wall, 1)
    return out
