"""`igpt eval`: test-set negative log-likelihood of a checkpoint on token shards, in nats and bits per token.

AR models score every pixel, the first one from the SOS position (input [SOS, x0 .. x_{n-2}]); the result is
the mean over all pixels of all images. BERT models score masked pixels only, under a fixed seeded mask (each
position masked independently with probability ``bert_mask_prob``): per image the mean over its masked pixels,
then the mean over the images that have one (an image without a masked pixel has nothing to score; the same
reduction as training's loss and validation loss). Under torchrun the ranks share the batches and rank 0 writes
the JSON (the same numbers as one process, up to the order of a float64 sum).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from igpt.errors import IgptError
from igpt.io import atomic_write_bytes, check_writable
from igpt.settings import check_seed
from igpt.shards import check_ids

EVAL_FILE = "eval.json"


@dataclass
class EvalConfig:
    checkpoint: str  # model checkpoint directory (a training checkpoint RUN/checkpoints/step-N works too)
    data: str  # token shards from `igpt prepare`
    split: str = "test"  # the held-out split the paper reports
    out: str | None = None  # JSON file to write; None: CHECKPOINT/eval.json
    batch_size: int = 64  # images per forward pass (bounds memory only; the result does not depend on it)
    max_images: int = 0  # 0: the whole split; else its first max_images images (quick looks)
    bert_mask_prob: float = 0.15  # the paper's BERT masking rate
    seed: int = 0  # seed of the fixed BERT mask
    device: str | None = None  # None: CUDA when present, else CPU

    def __post_init__(self) -> None:
        check_seed(self.seed, "eval config")
        for name in ("batch_size",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise IgptError(f"eval config: {name} must be a positive integer, got {v!r}")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 0:
            raise IgptError(f"eval config: max_images must be an integer >= 0, got {self.max_images!r}")
        if not 0.0 < self.bert_mask_prob <= 1.0:
            raise IgptError(f"eval config: bert_mask_prob must be in (0, 1], got {self.bert_mask_prob!r}")


def nats_to_bits(nats: float) -> float:
    """nats -> bits (divide by ln 2)."""
    return nats / math.log(2)


def check_compatible(model_cfg, shards, checkpoint_palette=None) -> None:
    """IgptError unless the shards' images fit the model: same n_px, same palette size (and palette, when the
    checkpoint stores one)."""
    if shards.n_px != model_cfg.n_px:
        raise IgptError(f"{shards.root}: images are {shards.n_px}x{shards.n_px} but the model sees "
                        f"{model_cfg.n_px}x{model_cfg.n_px}")
    if shards.palette.k != model_cfg.palette_size:
        raise IgptError(f"{shards.root}: palette of {shards.palette.k} colours but the model has "
                        f"{model_cfg.palette_size}")
    if checkpoint_palette is not None and checkpoint_palette.hash != shards.palette.hash:
        raise IgptError(f"{shards.root}: the shards were made with another palette than the checkpoint's")


def nll(model, tokens, batch_size: int = 64, mask_prob: float = 0.15, seed: int = 0, device="cpu") -> float:
    """Mean negative log-likelihood in nats per token of uint16 ids (N, T) (AR: every pixel; BERT: masked
    pixels under a fixed mask drawn from ``seed``, per image then over the images with a masked pixel)."""
    return score(model, tokens, batch_size, mask_prob, seed, device)[0]


@torch.no_grad()
def score(model, tokens, batch_size: int = 64, mask_prob: float = 0.15, seed: int = 0,
          device="cpu", shared: bool = False) -> tuple[float, int, int]:
    """``nll``'s mean, the images it averages over and the tokens it scored (BERT: those masked).

    ``shared`` under a process group (torchrun): every rank calls this with the same arguments, rank r scores
    batches r, r + world_size, ... and the sums are added over the ranks, so each returns the whole split's
    result. Off by default: a caller that scores on rank 0 alone would wait forever in the collective."""
    import torch.distributed as dist

    from igpt.model import scored_images
    from igpt.train import micro_loss

    cfg = model.config
    n = len(tokens)
    if n == 0:
        raise IgptError("no images to evaluate")
    rank, world = (dist.get_rank(), dist.get_world_size()) if shared and dist.is_initialized() else (0, 1)
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, tokens.shape[1], generator=g) < mask_prob if cfg.mode == "bert" else None
    total, images = 0.0, 0
    scored = n * tokens.shape[1] if masks is None else int(masks.sum())
    for i in range(rank * batch_size, n, world * batch_size):
        j = min(i + batch_size, n)
        px = torch.from_numpy(check_ids(tokens[i:j].astype("int64"), cfg.palette_size)).to(device)
        m = None if masks is None else masks[i:j].to(device)
        w = scored_images(px, m)  # AR: every image (each has T tokens); BERT: the images with a masked pixel
        total += micro_loss(model, px, m, cfg).double().item() * w
        images += w
    if world > 1:
        sums = torch.tensor([total, images], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, images = sums[0].item(), int(sums[1].item())
    if images == 0:
        raise IgptError(f"no image got a masked pixel at mask probability {mask_prob}: nothing to score")
    return total / images, images, scored


def evaluate(cfg: EvalConfig) -> dict:
    """Score ``cfg.split`` of the shards; write and return {'nats_per_token', 'bits_per_token', ...}."""
    from igpt.checkpoint import load_model
    from igpt.distributed import cleanup, get_dist_info, init_distributed, pick_device
    from igpt.shards import load_shards

    shards = load_shards(cfg.data)
    tokens = shards.tokens(cfg.split)
    if cfg.max_images:
        tokens = tokens[: cfg.max_images]
    if len(tokens) == 0:  # before loading the model; score() alone said "no images" without saying where
        raise IgptError(f"{cfg.data}: the {cfg.split} split has no images to evaluate")
    info = get_dist_info()
    device = pick_device(cfg.device, info)
    model, palette = load_model(cfg.checkpoint, device)
    check_compatible(model.config, shards, palette)
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint) / EVAL_FILE
    if info.is_main:  # before the scoring (minutes to hours on a large split), not after it (once the checkpoint
        check_writable(out)  # has loaded: the default out is inside it, and a wrong path must not make it)
    started = init_distributed(device)  # under torchrun the ranks share the batches (``score``)
    nats, images, scored = score(model, tokens, cfg.batch_size, cfg.bert_mask_prob, cfg.seed, device, shared=True)
    if not math.isfinite(nats):  # finite weights give finite logits: this model is damaged or diverged
        raise IgptError(f"{cfg.checkpoint}: the negative log-likelihood is {nats} (NaN or inf logits): damaged "
                        "weights or a diverged run")
    mode = model.config.mode
    res = {
        "nats_per_token": nats,
        "bits_per_token": nats_to_bits(nats),
        "tokens": "every pixel, the first scored from SOS" if mode == "ar" else
                  f"masked pixels only: a fixed mask (seed {cfg.seed}), each pixel masked with probability "
                  f"{cfg.bert_mask_prob}; mean per image, then over the images with a masked pixel",
        "mode": mode, "split": cfg.split, "images": len(tokens), "images_scored": images,
        "tokens_scored": scored, "tokens_per_image": int(tokens.shape[1]),
        "palette_size": model.config.palette_size, "checkpoint": str(cfg.checkpoint), "data": str(cfg.data),
        "config": asdict(cfg),
    }
    if info.world_size > 1:
        res["ranks"] = info.world_size
    if info.is_main:
        atomic_write_bytes(out, (json.dumps(res, indent=2) + "\n").encode())
    cleanup(started)
    res["out"] = str(out)
    return res
