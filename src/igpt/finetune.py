"""`igpt finetune`: joint fine-tuning of a pretrained iGPT with a linear classification head (Chen et al. 2020).

The head is a bias-free linear map (num_classes, d) (Hugging Face's ``score`` layout) on the mean over positions
of the final normalised features ln_f(h_L), the same feature as ``ImageGPT.features(idx, [n_layer])``. The loss
is L_clf + lambda * L_gen (lambda = 1 by default, 0 = classification only), L_gen being the model's own
objective (AR: next pixel over every pixel; BERT: masked pixels, per image then over the images
with one), both in nats.
One forward pass per batch gives both: the blocks run once, ln_f's output is pooled for the head and fed to
lm_head for L_gen (lm_head is skipped when lambda = 0, so it gets no gradient).

Protocol: AdamW betas (0.9, 0.95) at a constant learning rate (the paper: no cosine schedule for fine-tuning,
about 10x below pretraining), batches drawn epoch by epoch from a seeded permutation of train; validation
accuracy every ``eval_every`` steps and at the end; the best one (ties: the earlier step) keeps a copy of the
model and head in memory; ``patience`` evaluations without improvement stop the run; test accuracy is
computed once, at the end, with the best weights (the choice never sees test labels). BERT models are
trained on masked inputs (each pixel masked with ``bert_mask_prob``) and evaluated on ``mask_ensemble``
fixed seeded masks, averaging the predicted class probabilities (the paper ensembles 5). Accuracies are
fractions in [0, 1].

OUT/finetune.json holds the result and history; OUT/checkpoint is an igpt checkpoint of the best model with
the head in heads.safetensors as "score".
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from igpt.errors import IgptError
from igpt.io import atomic_write_bytes, output_lock
from igpt.model import ar_inputs, ar_loss, bert_loss, bert_mask
from igpt.settings import check_seed
from igpt.shards import check_ids, check_two_classes, class_count

FINETUNE_FILE, CHECKPOINT_DIR = "finetune.json", "checkpoint"


@dataclass
class FinetuneConfig:
    checkpoint: str  # pretrained igpt checkpoint directory
    data: str  # labelled token shards with train, val and test splits
    out: str  # directory for finetune.json and the best checkpoint
    lambda_gen: float = 1.0  # weight of L_gen in L_clf + lambda * L_gen (the paper's joint objective; 0 = off)
    lr: float = 3e-4  # constant; the paper fine-tunes ~10x below the pretraining peak, without cosine decay
    steps: int = 1000  # optimizer steps at most (early stopping may end sooner)
    batch_size: int = 64  # images per step
    eval_every: int = 100  # steps between validations (and one at the last step)
    patience: int = 0  # validations without a new best before stopping; 0 = never stop early
    mask_ensemble: int = 1  # BERT: average class probabilities over this many fixed random masks (paper: 5)
    bert_mask_prob: float = 0.15  # BERT: the paper's masking rate, in training and evaluation
    weight_decay: float = 0.0  # AdamW decoupled weight decay (the pretraining recipe uses none)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off (as training)
    eval_batch_size: int = 256  # images per forward pass in evaluation (memory only)
    seed: int = 0  # batch order, BERT masks (training and evaluation)
    device: str | None = None  # None: CUDA when present, else CPU

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "mask_ensemble", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise IgptError(f"finetune config: {name} must be a positive integer, got {v!r}")
        check_seed(self.seed, "finetune config")
        for name in ("patience",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise IgptError(f"finetune config: {name} must be an integer >= 0, got {v!r}")
        for name in ("lambda_gen", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
                raise IgptError(f"finetune config: {name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not 0 < self.lr < float("inf"):
            raise IgptError(f"finetune config: lr must be a positive number, got {self.lr!r}")
        if isinstance(self.bert_mask_prob, bool) or not isinstance(self.bert_mask_prob, int | float) \
                or not 0 < self.bert_mask_prob <= 1:
            raise IgptError(f"finetune config: bert_mask_prob must be in (0, 1], got {self.bert_mask_prob!r}")


# -- one forward pass, both losses ----------------------------------------------------------------------------
def joint_forward(model, head: nn.Module, pixels: torch.Tensor, mask: torch.Tensor | None = None,
                  with_gen: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pixels (B, T) ids (mask (B, T) bool for BERT models) -> (class logits (B, K), L_gen in nats per token or
    None when ``with_gen`` is False). The blocks run once: ln_f(h_L) (B, T, d) is mean-pooled for the head
    (= model.features(idx, [n_layer])) and, when asked, fed to lm_head for the model's own loss."""
    cfg = model.config
    idx = ar_inputs(pixels, cfg.sos_id) if mask is None else pixels
    *_, x = model._blocks(model.embed(idx, mask))  # the residual after the last block (B, T, d)
    h = model.ln_f(x)  # (B, T, d)
    logits = head(h.mean(dim=1))  # (B, K)
    if not with_gen:
        return logits, None
    lm = model.lm_head(h)  # (B, T, palette_size)
    return logits, (ar_loss(lm, pixels) if mask is None else bert_loss(lm, pixels, mask))


def joint_loss(model, head, pixels, labels, mask=None, lambda_gen: float = 1.0) -> tuple[torch.Tensor, dict]:
    """L_clf + lambda * L_gen (nats) and its parts {'clf', 'gen' (None when lambda = 0), 'loss'} as floats."""
    logits, gen = joint_forward(model, head, pixels, mask, with_gen=lambda_gen > 0)
    clf = F.cross_entropy(logits.float(), labels.long())
    loss = clf if gen is None else clf + lambda_gen * gen
    return loss, {"loss": loss.item(), "clf": clf.item(), "gen": None if gen is None else gen.item()}


def eval_masks(n: int, t: int, k: int, p: float, seed: int, split: str) -> list[torch.Tensor]:
    """``k`` fixed (n, t) bool masks for one split: the same at every evaluation, different per member and per
    split (val and test had shared masks row for row)."""
    def gen(i: int) -> torch.Generator:
        state = np.random.SeedSequence([seed, *split.encode(), i]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state) >> 1)

    return [bert_mask((n, t), gen(i), p) for i in range(k)]


@torch.no_grad()
def predict_proba(model, head, tokens: np.ndarray, masks: list[torch.Tensor] | None = None,
                  batch_size: int = 256, device="cpu") -> np.ndarray:
    """uint16 ids (N, T) -> float64 class probabilities (N, K); for BERT models the mean over ``masks``."""
    was = model.training, head.training
    model.eval()
    head.eval()
    out = []
    for i in range(0, len(tokens), batch_size):
        px = torch.from_numpy(check_ids(np.asarray(tokens[i : i + batch_size]).astype(np.int64),
                                        model.config.palette_size)).to(device)  # (B, T)
        members = [None] if masks is None else [m[i : i + len(px)].to(device) for m in masks]
        probs = sum(torch.softmax(joint_forward(model, head, px, m, with_gen=False)[0].double(), -1)
                    for m in members)
        out.append((probs / len(members)).cpu().numpy())
    model.train(was[0])
    head.train(was[1])
    return np.concatenate(out) if out else np.zeros((0, head.weight.shape[0]))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows whose argmax is the label; a row that is not finite counts as wrong (numpy's argmax
    of NaNs is 0: such rows were scored as predictions of class 0)."""
    right = (probs.argmax(1) == labels) & np.isfinite(probs).all(1)
    return float(right.mean()) if len(labels) else 0.0


class EarlyStopping:
    """Tracks the best validation accuracy (ties keep the earlier step) and says when to stop: after
    ``patience`` evaluations in a row without a new best (patience 0: never)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_step, self.bad = patience, None, None, 0

    def update(self, step: int, acc: float) -> bool:
        """Record one evaluation; True when it is a new best."""
        if self.best is None or acc > self.best:
            self.best, self.best_step, self.bad = acc, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


# -- the command ----------------------------------------------------------------------------------------------
def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune ``cfg.checkpoint`` on the labelled shards; write OUT/finetune.json and OUT/checkpoint.
    Returns the JSON's dict plus 'model' and 'head' (the best weights, in eval mode)."""
    with output_lock(cfg.out):  # a second run into --out stops at once
        return _finetune(cfg)


def _finetune(cfg: FinetuneConfig) -> dict:
    from igpt.checkpoint import load_model, save_model
    from igpt.distributed import get_dist_info, pick_device
    from igpt.evaluate import check_compatible
    from igpt.io import check_replaceable, check_writable
    from igpt.shards import load_shards

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise IgptError(f"--out {cfg.out} exists and is not a directory")
    check_replaceable(out / CHECKPOINT_DIR, {"config.json": "palette_size"})  # a model checkpoint
    shards = load_shards(cfg.data)
    splits = ("train", "val", "test")
    missing = [s for s in splits if s not in shards.splits or shards.labels(s) is None]
    if missing:
        raise IgptError(f"{cfg.data}: fine-tuning needs labelled train, val and test splits; missing or "
                        f"unlabelled: {', '.join(missing)}")
    device = pick_device(cfg.device, get_dist_info())
    model, palette = load_model(cfg.checkpoint, device)
    model = model.float()  # fp16 / bf16 / fp64 checkpoints load in their dtype: fine-tune (head, AdamW) in fp32
    mcfg = model.config
    check_compatible(mcfg, shards, palette)
    if cfg.mask_ensemble > 1 and mcfg.mode != "bert":
        raise IgptError(f"--mask-ensemble {cfg.mask_ensemble}: mask ensembling applies to BERT models only; "
                        f"this checkpoint is {mcfg.mode}")
    tokens = {s: shards.tokens(s) for s in splits}
    y = {s: shards.labels(s).astype(np.int64) for s in splits}
    empty = [s for s in splits if len(tokens[s]) == 0]
    if empty:
        raise IgptError(f"{cfg.data}: fine-tuning needs images in train, val and test; empty: {', '.join(empty)}")
    n_classes = class_count(y, shards.meta.get("class_names"), cfg.data)
    check_two_classes(y["train"], cfg.data, "fine-tuning")
    check_writable(out / FINETUNE_FILE)  # before the training, not after it
    bert = mcfg.mode == "bert"
    masks = {s: eval_masks(len(tokens[s]), mcfg.seq_len, cfg.mask_ensemble, cfg.bert_mask_prob, cfg.seed, s)
             if bert else None for s in ("val", "test")}

    torch.manual_seed(cfg.seed)
    head = nn.Linear(mcfg.n_embd, n_classes, bias=False).to(device)
    nn.init.zeros_(head.weight)  # uniform first prediction; the trunk is not pushed by a random head
    model.train()
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    order, pos = rng.permutation(len(tokens["train"])), 0
    stopper = EarlyStopping(cfg.patience)
    history, train_log, best_state, diverged = [], [], None, None
    step = 0
    for step in range(1, cfg.steps + 1):
        # a new permutation when the rest of this one cannot fill a batch (drop_last: no image twice within an
        # epoch; the len % batch_size left over take their chance in the next permutation)
        if pos + cfg.batch_size > len(order) and pos > 0:
            order, pos = rng.permutation(len(tokens["train"])), 0
        idx = np.sort(order[pos : pos + cfg.batch_size])
        pos += cfg.batch_size
        px = torch.from_numpy(check_ids(tokens["train"][idx].astype(np.int64), mcfg.palette_size)).to(device)
        lab = torch.from_numpy(y["train"][idx]).to(device)
        m = bert_mask(tuple(px.shape), g, cfg.bert_mask_prob).to(device) if bert else None
        loss, parts = joint_loss(model, head, px, lab, m, cfg.lambda_gen)
        if not np.isfinite(parts["loss"]):
            diverged = f"non-finite loss ({parts['loss']}) at step {step}; try a lower --lr"
            if step == 1 and not np.isfinite(parts["clf"] + (parts["gen"] or 0.0)):  # no update has run yet
                diverged = (f"{cfg.checkpoint}: non-finite loss ({parts['loss']}) at step 1, before any update: "
                            "damaged weights or a diverged pretraining run")
            if best_state is None:
                raise IgptError(diverged)
            step -= 1  # this step did not run: keep the best weights so far, score test, write, then fail
            break
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_log.append({"step": step, **parts})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            probs = predict_proba(model, head, tokens["val"], masks["val"], cfg.eval_batch_size, device)
            if not np.isfinite(probs).all():  # the weights blew up: never a best step (nor the first one)
                diverged = f"non-finite class probabilities on val at step {step}; try a lower --lr"
                if best_state is None:
                    raise IgptError(diverged)
                break  # this step's weights are dropped: the best ones are scored and written, then fail
            acc = accuracy(probs, y["val"])
            history.append({"step": step, "val_accuracy": acc, "train_loss": parts["loss"]})
            if stopper.update(step, acc):
                best_state = (copy.deepcopy(model.state_dict()), copy.deepcopy(head.state_dict()))
            if stopper.should_stop:
                break
    model.load_state_dict(best_state[0])
    head.load_state_dict(best_state[1])
    model.eval()
    head.eval()
    test_acc = accuracy(predict_proba(model, head, tokens["test"], masks["test"], cfg.eval_batch_size, device),
                        y["test"])
    res = {
        "val_accuracy": stopper.best, "test_accuracy": test_acc, "best_step": stopper.best_step,
        "steps_run": step, "stopped_early": step < cfg.steps, "history": history, "train": train_log,
        "objective": f"L_clf + {cfg.lambda_gen:g} * L_gen (nats; L_gen: "
                     + ("next pixel over every pixel)" if not bert else
                        f"masked pixels, p = {cfg.bert_mask_prob}, per image then over the images with one)"),
        "evaluation": ("argmax of the class probabilities" if not bert else
                       f"class probabilities averaged over {cfg.mask_ensemble} fixed random mask(s) "
                       f"(p = {cfg.bert_mask_prob}, seed {cfg.seed})"),
        "accuracy_unit": "fraction in [0, 1]", "mode": mcfg.mode, "n_classes": n_classes,
        "counts": {s: len(y[s]) for s in splits}, "checkpoint": str(cfg.checkpoint), "data": str(cfg.data),
        "out_checkpoint": str(out / CHECKPOINT_DIR), "config": asdict(cfg), "diverged": diverged,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / FINETUNE_FILE).unlink(missing_ok=True)  # never the old run's record beside the new weights
    save_model(out / CHECKPOINT_DIR, model, palette if palette is not None else shards.palette,
               heads={"score": head.weight})
    atomic_write_bytes(out / FINETUNE_FILE, (json.dumps(res, indent=2) + "\n").encode())
    if diverged:
        raise IgptError(f"{diverged}; kept the best weights (step {stopper.best_step}) in {out / CHECKPOINT_DIR}")
    return {**res, "model": model, "head": head}
