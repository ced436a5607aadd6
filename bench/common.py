"""Shared pieces of the benchmarks: contention measurement, peak memory, timing, and the two models.

Contention: with 2 cores any other process distorts the numbers, and os.getloadavg() counts the benchmark's
own threads too. So each timed run also records "others_cores": the CPU time the whole machine spent busy
(/proc/stat) minus the benchmark's own CPU time (and its children's), divided by the wall time (0 = nobody
else; 1 = a whole core taken by others).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

PALETTE = 512  # the paper's 9-bit palette; vocab = 513 (SOS), head = 512 outputs


def busy_s() -> float | None:
    """Seconds of CPU time the machine has spent busy (all cores, since boot), from /proc/stat; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds used by this process and its waited-for children."""
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


class Contention:
    """CPU cores used by other processes during a `with` block (``.others``; our process and children excluded)
    and the block's wall time (``.wall``, seconds)."""

    def __enter__(self):
        self.t, self.busy, self.own = time.perf_counter(), busy_s(), own_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        own = own_cpu_s() - self.own
        end = busy_s()
        self.others = None if end is None or self.busy is None else round(
            max(0.0, (end - self.busy - own) / self.wall), 3)


def rss_mb() -> float:
    """Peak resident set of this process so far, MB: VmHWM of /proc/self/status (KiB). Not ru_maxrss, which
    after fork + exec starts at the parent's peak (Linux keeps the old image's high-water mark)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs) -> float:
    return statistics.median(list(xs))


def ab_order(r: int, a: str = "ours", b: str = "reference") -> tuple[str, str]:
    """Round r's order: A B, then B A, ... so neither side always runs first."""
    return (a, b) if r % 2 == 0 else (b, a)


def others_summary(values) -> dict:
    """{'max': .., 'mean': ..} of the others_cores values (None entries skipped)."""
    v = [x for x in values if x is not None]
    return {"max": round(max(v), 3), "mean": round(sum(v) / len(v), 3)} if v else {"max": None, "mean": None}


def hf_model(n_px: int, d: int, L: int, H: int):
    """transformers' ImageGPTForCausalImageModeling of this shape, dropout 0 everywhere."""
    import transformers

    cfg = transformers.ImageGPTConfig(vocab_size=PALETTE + 1, n_positions=n_px * n_px, n_embd=d, n_layer=L,
                                      n_head=H, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.ImageGPTForCausalImageModeling(cfg)


def our_model(n_px: int, d: int, L: int, H: int):
    from igpt.model import ImageGPT, ImageGPTConfig

    return ImageGPT(ImageGPTConfig(n_px=n_px, palette_size=PALETTE, n_embd=d, n_layer=L, n_head=H))


def flops_per_token(model) -> tuple[int, int]:
    """(training FLOPs per token, N) for an igpt ImageGPT: 6 N + 12 L T d (forward + backward), N = the
    non-embedding parameters (output head included; wte and wpe are lookups). 12 L T d counts the attention
    scores and the weighted sum of values over the full T x T (no causal halving), as in the PaLM appendix."""
    cfg = model.config
    N = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("wte.", "wpe.")))
    return 6 * N + 12 * cfg.n_layer * cfg.seq_len * cfg.n_embd, N
