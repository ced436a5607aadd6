"""A run's outputs on rank 0: metrics.jsonl, loss.png, a progress bar or plain lines, TensorBoard if installed."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from igpt.errors import IgptError
from igpt.io import atomic_write_bytes, figure_png

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def bits(nats: float) -> float:
    """nats -> bits (per token: the paper's bits per dimension for one-channel-per-token palettes)."""
    return nats / math.log(2)


class RunLog:
    """One JSON object per line in RUN/metrics.jsonl. On resume the rows after the resumed step (written by the
    interrupted process after its last checkpoint) are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, out: Path, start_step: int, total: int, progress: bool | None):
        self.out = out
        self.path = out / METRICS
        rows = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        self.rows = rows
        self.file = open(self.path, "a")  # noqa: SIM115 - open for the whole run
        show = sys.stderr.isatty() if progress is None else progress
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # events from step start_step + 1 on, written by an interrupted process after its checkpoint, are
            # purged (TensorBoard showed steps 4, 5, 6 twice after a resume at 3, as metrics.jsonl drops them)
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            pass

    def log(self, row: dict) -> None:
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["step"])
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        else:
            print(text, flush=True)

    def sync(self) -> None:
        """Make the rows written so far durable (flush + fsync): called before each checkpoint, so that a power
        loss cannot keep a checkpoint and drop the rows logged before it (resume keeps rows up to its step)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def plot(self) -> None:
        """loss.png: training loss per logged step and validation loss, in nats per token (atomic write)."""
        atomic_write_bytes(self.out / PLOT, loss_png(self.rows))

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. Its last line may be cut short (a process killed, or a disk full, while it
    appended): that row is dropped. Any other unreadable line is an IgptError naming it."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row")
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise IgptError(f"{path}: line {i + 1} is not a metrics row ({e})") from None
        rows.append(row)
    return rows


def loss_png(rows: list[dict], in_bits: bool = False) -> bytes:
    """Training loss per logged step and validation loss from metrics rows, in nats (or bits) per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = 1 / math.log(2) if in_bits else 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(r["step"], r["loss"] * f) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"] * f) for r in rows if "val_loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({'bits' if in_bits else 'nats'} / token)")
    if tr or va:  # a checkpoint before the first logged step plots no line yet (legend() would warn)
        ax.legend()
    ax.grid(alpha=0.3)
    return figure_png(fig)
