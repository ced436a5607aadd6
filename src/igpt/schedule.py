"""The learning-rate schedule as a pure function of the step (the paper's: linear warm-up, cosine to zero).

There is no scheduler object to save: the schedule's whole state is the step, which checkpoints carry.
"""

from __future__ import annotations

import math


def lr_at(step: int, max_lr: float, warmup: int, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``.

    Steps 0 .. warmup-1 rise linearly: max_lr * (step + 1) / warmup (the first step already moves, the last
    warm-up step reaches max_lr). Then cosine decay from max_lr at step ``warmup`` towards 0 at step ``total``:
    max_lr * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))). Steps >= total get 0.
    """
    if step < 0 or total < 1 or warmup < 0:
        raise ValueError(f"lr_at: need step >= 0, total >= 1, warmup >= 0 (got {step}, {total}, {warmup})")
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return 0.0
    progress = (step - warmup) / max(1, total - warmup)  # in [0, 1)
    return max_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
