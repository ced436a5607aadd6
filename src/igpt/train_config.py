"""TrainConfig: every setting of a pretraining run, validated on construction, saved as JSON in the run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from igpt.errors import IgptError
from igpt.model import MODES
from igpt.settings import build, check_seed

DTYPES = ("auto", "fp32", "bf16")
# Settings a resumed run may change (bookkeeping, and how the same computation is laid out: micro_batch_size
# only bounds memory, and must change when the rank count does; activation_checkpointing only bounds memory,
# recomputing the same blocks with the same dropout masks): everything else must match the saved run.
RESUMABLE_CHANGES = ("out", "resume", "stop_at", "time_limit", "log_every", "save_every", "eval_every", "keep",
                     "progress", "compile", "device", "fsdp", "micro_batch_size", "activation_checkpointing")


@dataclass
class TrainConfig:
    data: str  # token shards from `igpt prepare`
    preset: str = "cpu-small"  # model size (igpt.presets); n_px and palette_size come from the shards
    model_overrides: dict = field(default_factory=dict)  # ImageGPTConfig fields over the preset, e.g. n_layer
    objective: str = "ar"  # 'ar' next pixel, 'bert' masked pixel
    out: str = "runs/igpt"  # run directory: config.json, metrics.jsonl, loss.png, checkpoints/
    steps: int = 1000  # optimizer steps; the schedule decays to zero at this step
    batch_size: int = 64  # global batch (images per optimizer step), split over ranks and accumulation
    micro_batch_size: int | None = None  # images per forward pass on one rank; None: batch_size / ranks
    lr: float = 1e-3  # peak learning rate (the paper sweeps it per model)
    warmup: int = 100  # linear warm-up steps (the paper: 1 epoch on ImageNet at scale)
    betas: tuple[float, float] = (0.9, 0.95)  # the paper's Adam betas
    weight_decay: float = 0.0  # the paper: none
    dropout: float = 0.0  # the paper: none
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    bert_mask_prob: float = 0.15  # the paper's BERT masking rate
    augment: bool = False  # random crop (reflect padding n_px/8) + horizontal flip, as the paper for CIFAR
    dtype: str = "auto"  # autocast: 'auto' = bf16 on CUDA and on CPUs with native bf16, else fp32
    compile: bool = False  # torch.compile each block (opt-in: ~1.1x on 2 CPU cores, 1.3-1.8x on an H100)
    activation_checkpointing: bool = False  # recompute blocks in backward: less memory, ~1/3 more compute
    fsdp: bool = False  # FSDP2 fully_shard instead of DDP when several processes run
    device: str | None = None  # None: CUDA when present, else CPU
    seed: int = 0  # model init, data order, masks and augmentation
    log_every: int = 10  # steps between metrics rows
    eval_every: int = 500  # steps between validations (and at the last step); 0: only at the end
    eval_images: int = 1000  # validation images per evaluation (N spread evenly over the val split); 0: all
    save_every: int = 500  # steps between checkpoints (and at the last step)
    keep: int = 3  # checkpoints kept (the newest ones)
    resume: str | None = None  # 'auto' (newest complete checkpoint in out/checkpoints, if any) or a path
    stop_at: int | None = None  # stop after this step as if interrupted (checkpointing first); for tests
    # stop (checkpointing first) after the step during which this many seconds of the loop have passed; the
    # schedule stays that of `steps` (a wall-time guard, e.g. for the demo's budget)
    time_limit: float | None = None
    progress: bool | None = None  # progress bar; None: when stderr is a terminal

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "log_every", "keep"):
            _positive(name, getattr(self, name))
        for name in ("warmup", "eval_every", "eval_images", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise IgptError(f"train config: {name} must be an integer >= 0, got {v!r}")
        check_seed(self.seed, "train config")
        if self.micro_batch_size is not None:
            _positive("micro_batch_size", self.micro_batch_size)
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise IgptError(f"train config: stop_at must be in [1, steps={self.steps}], got {self.stop_at}")
        if self.time_limit is not None and (isinstance(self.time_limit, bool) or not 0 < self.time_limit < math.inf):
            raise IgptError(f"train config: time_limit must be a finite number of seconds > 0, got "
                            f"{self.time_limit!r}")
        if self.objective not in MODES:
            raise IgptError(f"train config: objective must be one of {MODES}, got {self.objective!r}")
        if self.dtype not in DTYPES:
            raise IgptError(f"train config: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise IgptError(f"train config: lr must be a finite number > 0, got {self.lr}")
        if self.warmup > self.steps:
            raise IgptError(f"train config: warmup ({self.warmup} steps) is longer than the run ({self.steps} steps): "
                            "the learning rate would never reach its peak; set --warmup")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise IgptError(f"train config: betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise IgptError(f"train config: {name} must be a finite number >= 0, got {v}")
        if not 0 <= self.dropout < 1:
            raise IgptError(f"train config: dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.bert_mask_prob < 1:
            raise IgptError(f"train config: bert_mask_prob must be in (0, 1), got {self.bert_mask_prob}")
        bad = sorted(set(self.model_overrides) & {"mode", "dropout"})
        if bad:
            raise IgptError(f"train config: set {bad} with objective / dropout, not as model overrides")
        if self.resume not in (None, "auto") and not self.resume:
            raise IgptError("train config: resume must be 'auto' or a checkpoint directory")

    def layout(self, world_size: int) -> tuple[int, int]:
        """(micro_batch, accumulation steps) for ``world_size`` ranks; IgptError when the global batch does not
        split evenly (checked before any process group starts or data is read)."""
        if self.batch_size % world_size:
            raise IgptError(f"batch_size {self.batch_size} is not divisible by the {world_size} ranks")
        per_rank = self.batch_size // world_size
        micro = self.micro_batch_size or per_rank
        if per_rank % micro:
            raise IgptError(f"batch_size {self.batch_size} is not divisible by ranks x micro_batch_size "
                            f"({world_size} x {micro})")
        return micro, per_rank // micro

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From settings that may come from a file: unknown names and values of the wrong type are IgptErrors
        naming the field (JSON lists are accepted for tuples)."""
        return build(cls, d, "train")


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise IgptError(f"train config: {name} must be a positive integer, got {v!r}")


def changed_fields(saved: dict, now: TrainConfig) -> list[str]:
    """Fields of ``now`` that differ from the saved run's config and may not change on resume."""
    cur = now.to_dict()
    return sorted(k for k in cur if k not in RESUMABLE_CHANGES and saved.get(k) != cur[k])
