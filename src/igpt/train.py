"""Pretraining: AR (next pixel) or BERT (masked pixel) on token shards, one process or many under torchrun.

``train(cfg)`` does, in order: check the batch layout and the model against the shards (before any process
group starts or data is read), start the process group, build and wrap the model (igpt.distributed), resume if
asked, then run ``cfg.steps`` optimizer steps of ``cfg.batch_size`` images each (split over ranks and
micro-batches), logging, validating and checkpointing on rank 0's schedule. The paper's recipe: AdamW
betas (0.9, 0.95), linear warm-up then cosine decay to 0 (igpt.schedule), no weight decay, no dropout, gradient
clipping. Steps are counted from 1 in metrics and checkpoint names (step-000010 = after 10 optimizer steps).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from igpt import __version__
from igpt import distributed as D
from igpt.errors import IgptError
from igpt.io import atomic_write_bytes, check_replaceable, output_lock, read_json, remove_stale_temporaries
from igpt.loader import BatchStream
from igpt.model import ImageGPT, ImageGPTConfig, ar_inputs, ar_loss, bert_loss, scored_images
from igpt.presets import get_preset
from igpt.schedule import lr_at
from igpt.shards import check_ids, load_shards
from igpt.train_config import RESUMABLE_CHANGES, TrainConfig, changed_fields
from igpt.train_log import METRICS, PLOT, RunLog, bits
from igpt.train_state import (
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_newest,
    load_train_checkpoint,
    prune,
    remove_leftovers,
    rng_state,
    save_train_checkpoint,
    set_aside,
    set_rng_state,
)

CONFIG_FILE = "config.json"


def resolve_model_config(cfg: TrainConfig, meta: dict) -> ImageGPTConfig:
    """Preset + overrides, with n_px and palette_size from the shards' meta.json. An explicit override that
    contradicts the shards is an error (a context longer than the position table, or another palette)."""
    ov = dict(cfg.model_overrides)
    for key, have in (("n_px", int(meta["n_px"])), ("palette_size", int(meta["palette_size"]))):
        want = ov.setdefault(key, have)
        if isinstance(want, bool) or not isinstance(want, int):
            raise IgptError(f"model override {key} must be an integer, got {want!r}")
        if key == "n_px" and want < have:
            raise IgptError(f"the shards' images need a context of {have * have} tokens ({have}x{have}) but the "
                            f"model's position table has {want * want} (n_px {want})")
        if want != have:
            raise IgptError(f"model {key} {want} contradicts the shards ({cfg.data}/meta.json: {key} {have})")
    return get_preset(cfg.preset, **ov, mode=cfg.objective, dropout=cfg.dropout)


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits_memory(mcfg: ImageGPTConfig, batch_per_rank: int) -> None:
    """IgptError when the model's float32 weights (a lower bound on its parameters: 12 d^2 per layer plus the
    embeddings and head) and one step's token ids (int64) alone exceed the machine's memory: a typo such as
    --n-layer 1000000000000 built modules until the process was killed, and --n-embd 2^40 or --batch-size 10^30
    ended in an allocation traceback. Both are built in host memory first, on any device."""
    have = physical_memory()
    d = mcfg.n_embd
    params = 12 * mcfg.n_layer * d * d + d * (mcfg.vocab_size + mcfg.seq_len + mcfg.palette_size)
    need = 4 * params + 8 * batch_per_rank * mcfg.seq_len
    if have is not None and need > have:
        raise IgptError(f"the model ({mcfg.n_layer} layers, {d} wide: at least {params:,} parameters) and a batch "
                        f"of {batch_per_rank:,} images need at least {need / 2**30:,.1f} GiB, more than this "
                        f"machine's {have / 2**30:,.1f} GiB of memory")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA, and on CPUs with native bf16 (avx512_bf16 / AMX; measured 1.4-1.5x faster training
    there); fp32 otherwise."""
    if name != "auto":
        return torch.bfloat16 if name == "bf16" else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' / 'float32': how config.json and checkpoints record the dtype a run trains in."""
    return str(dtype).removeprefix("torch.")


def find_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(Path(cfg.out) / "checkpoints")
    return Path(cfg.resume)


def micro_loss(model, pixels: torch.Tensor, mask: torch.Tensor | None, cfg: ImageGPTConfig) -> torch.Tensor:
    """Nats per token of one micro-batch (AR: every pixel; BERT: masked pixels, per image, then over the images
    with one)."""
    if mask is None:
        return ar_loss(model(ar_inputs(pixels, cfg.sos_id)), pixels)
    return bert_loss(model(pixels, mask), pixels, mask)


def eval_rows(total: int, n: int) -> np.ndarray:
    """``n`` of ``total`` row indices, evenly spaced and ascending (all of them when n == total)."""
    return np.arange(n) if n >= total else np.linspace(0, total - 1, n).round().astype(np.int64)


@torch.no_grad()
def evaluate(model, tokens, mcfg: ImageGPTConfig, cfg: TrainConfig, micro: int, device, autocast) -> float:
    """Validation loss in nats per token over ``cfg.eval_images`` val images spread evenly over the split (its
    first rows were a few classes of a class-ordered source, such as an image folder); each rank takes a
    disjoint slice of them, shares differing by at most one image; every rank runs the same number of forward
    passes, as FSDP needs, a rank whose share is done repeating its first image at weight 0."""
    info = D.get_dist_info()
    n = len(tokens) if cfg.eval_images == 0 else min(cfg.eval_images, len(tokens))
    rows = eval_rows(len(tokens), n)
    lo, hi = info.rank * n // info.world_size, (info.rank + 1) * n // info.world_size
    passes = math.ceil(math.ceil(n / info.world_size) / micro)  # the largest share's micro-batches
    g = torch.Generator().manual_seed(cfg.seed + 7919)  # the same BERT masks at every evaluation
    masks = torch.rand(n, tokens.shape[1], generator=g) < cfg.bert_mask_prob if cfg.objective == "bert" else None
    was = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of per-image losses, images)
    for k in range(passes):
        i, j = lo + k * micro, min(lo + (k + 1) * micro, hi)
        i, j, live = (i, j, True) if i < hi else (lo, lo + 1, False)
        px = torch.from_numpy(check_ids(tokens[rows[i:j]].astype("int64"), mcfg.palette_size)).to(device)
        m = None if masks is None else masks[i:j].to(device)
        with autocast():
            loss = micro_loss(model, px, m, mcfg)
        if live:
            w = scored_images(px, m)
            total += torch.tensor([loss.item() * w, w], dtype=torch.float64, device=device)
    model.train(was)
    D.all_reduce_sum(total)
    return (total[0] / total[1].clamp_min(1)).item()


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training. Returns {'losses': {step: loss}, 'val': {step: val_loss}, 'model': the
    unwrapped model, 'checkpoint': last checkpoint path or None}. Under torchrun, an error leaves the process
    group up: end the failed rank with ``igpt.distributed.exit_failed_rank`` (as the ``igpt`` command does)."""
    with output_lock(cfg.out):  # rank 0's: a second run into --out stops at once
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict:
    info = D.get_dist_info()
    micro, accum = cfg.layout(info.world_size)  # before anything else
    shards = load_shards(cfg.data)  # reads meta.json and the arrays' headers, not the data
    if "train" not in shards.splits or len(shards.tokens("train")) == 0:  # an IndexError in the loader
        raise IgptError(f"{cfg.data}: no training images (the train split is missing or empty)")
    mcfg = resolve_model_config(cfg, shards.meta)
    check_fits_memory(mcfg, cfg.batch_size // info.world_size)  # before the model is built (a hang or a traceback)
    resume = find_resume(cfg)
    if resume is not None and cfg.resume != "auto" and not resume.is_dir():
        raise IgptError(f"--resume {resume}: no such checkpoint directory")
    out = Path(cfg.out)
    if (out / "model.safetensors").exists():  # its config.json is a model's, not a run's: never write over it
        raise IgptError(f"{out} holds a model (model.safetensors), not a training run; choose another --out")
    if resume is not None and cfg.resume != "auto":
        check_replaceable(out, {CONFIG_FILE: "igpt_version"})  # an explicit --resume DIR writes into --out: it must be ours
        _check_same_run(out, resume)
        at = checkpoint_step(resume)  # from its name, else from its train_state.json (a copy under another name)
        if at is None and (resume / "train_state.json").is_file():
            try:
                at = read_json(resume / "train_state.json").get("step")
            except (IgptError, AttributeError):
                at = None  # damaged: loading it below says so
        at = at if isinstance(at, int) else None
        newer = [p.name for p in list_checkpoints(out / "checkpoints") if at is not None and checkpoint_step(p) > at]
        if newer:  # the branch would overwrite, then prune, them (and --resume auto would pick them)
            raise IgptError(f"--resume {resume} (step {at}): {out / 'checkpoints'} holds later checkpoints "
                            f"({', '.join(newer)}) of another branch; move them away or choose another --out")
    if info.is_main and resume is None:
        check_replaceable(out, {CONFIG_FILE: "igpt_version"})
        if latest_checkpoint(out / "checkpoints") is not None:
            raise IgptError(f"{out} already holds a run with checkpoints; continue it with --resume auto, "
                            "or choose another --out")
    device = D.pick_device(cfg.device, info)
    dtype = pick_dtype(cfg.dtype, device)
    started = D.init_distributed(device)
    try:  # on an error the process group stays up: a failed rank ends with D.exit_failed_rank (the CLI does)
        result = _run(cfg, shards, mcfg, micro, accum, resume, device, dtype)
    except OSError as e:  # a full disk, a read-only or vanished --out: one line, not a traceback
        last = latest_checkpoint(out / "checkpoints")
        raise IgptError(f"{e.filename or out}: {e.strerror or e}; training stopped"
                        + (f" (the last good checkpoint is {last})" if last else "")) from None
    D.cleanup(started)
    return result


def fused_adamw(device: torch.device, sharded: bool = False) -> bool | None:
    """``fused`` for torch.optim.AdamW: True on CUDA and CPU parameters, None (torch's default) otherwise."""
    return True if device.type in ("cuda", "cpu") and not sharded else None


def _run(cfg, shards, mcfg, micro, accum, resume, device, dtype) -> dict:
    info = D.get_dist_info()
    out, ckpt_root = Path(cfg.out), Path(cfg.out) / "checkpoints"
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = ImageGPT(mcfg, activation_checkpointing=cfg.activation_checkpointing).to(device).train()
    wrapped = D.wrap_model(model, device, fsdp=cfg.fsdp, compile=cfg.compile)
    # the fused update (one kernel over all parameters; measured 2-5% faster CPU training steps at the demo's
    # and t16's shapes than the per-parameter loop); not under FSDP2's sharded DTensor parameters
    fused = fused_adamw(device, sharded=cfg.fsdp and info.distributed)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=fused)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start, best, state, skipped = 0, None, None, []
    if resume is not None and cfg.resume == "auto":  # the newest that loads: a damaged one is set aside
        resume, state, skipped = load_newest(ckpt_root, mcfg, load_train_checkpoint) or (None, None, [])
    elif resume is not None:
        state = load_train_checkpoint(resume, mcfg)
    seen = D.gather_objects(str(resume))  # every rank must see the same files (a shared disk)
    if len(set(seen)) > 1:
        raise IgptError(f"ranks would resume from different checkpoints ({seen}); --out must be on a file "
                        "system that every machine shares")
    if info.is_main:  # after every rank has loaded (the gather above): nothing reads the damaged ones now
        for path, why in skipped:
            print(f"warning: {why}; kept as {set_aside(path, resume).name}, resuming from {resume.name}",
                  file=sys.stderr, flush=True)
        if resume is not None:  # a save killed at its last step (pruning) has no later save to clean up after it
            remove_leftovers(ckpt_root)
    # the data this run reads, fingerprinted once: the loader's memory maps keep the files opened here, so a
    # checkpoint must not describe files that replaced them since (`igpt prepare` into the same folder mid-run)
    identity = shards_identity(shards)
    if state is not None:
        bad = changed_fields(state["meta"]["train_config"], cfg)
        saved_shards = state["meta"].get("shards")  # checkpoints since 2026-11-27 (twelfth session)
        if saved_shards is not None:  # the data by content, not by the path it was given as
            bad = [k for k in bad if k != "data"]
            now = identity
            differ = sorted(k for k in now if k in saved_shards and saved_shards[k] != now[k])  # older: fewer keys
            if differ:
                raise IgptError(f"{resume}: cannot resume on other shards: {cfg.data} differs from the run's in "
                                + ", ".join(f"{k} ({saved_shards.get(k)} -> {now[k]})" for k in differ))
        saved_dtype = state["meta"].get("dtype")  # the resolved one, checkpoints since the thirteenth session
        if saved_dtype is not None:  # the precision the run trained in, not the --dtype word that chose it
            bad = [k for k in bad if k != "dtype"]
            if saved_dtype != dtype_name(dtype):
                flag = {"bfloat16": "bf16", "float32": "fp32"}.get(saved_dtype, saved_dtype)
                raise IgptError(f"{resume}: the run trained in {saved_dtype}, but --dtype {cfg.dtype} means "
                                f"{dtype_name(dtype)} on this {device.type}; resume with --dtype {flag} to keep "
                                "its precision")
        if bad:
            raise IgptError(f"{resume}: cannot resume with changed settings {bad} (saved: "
                            f"{ {k: state['meta']['train_config'].get(k) for k in bad} })")
        if info.is_main:  # a save killed at its last step before it pruned has no later save to prune after it
            prune(ckpt_root, cfg.keep, resume)  # (here, once the settings are known to resume: not on a refusal)
        set_state_dict(wrapped, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(full_state_dict=True))
        for group in opt.param_groups:  # the saved groups' `fused` is that of the run that saved them (fused on
            group["fused"] = fused  # one rank, then resumed under FSDP2, would have used it over DTensors)
        rngs = state["rng"]
        same = len(rngs) == info.world_size
        set_rng_state(rngs[info.rank] if same else rngs[0], str(resume / "rng.pt"), device)
        start, best = state["meta"]["step"], state["meta"].get("best_val_loss")
        if not same:  # another rank count: one saved state for all, so reseed to keep dropout noise per rank
            torch.manual_seed(((cfg.seed + info.rank) * 1_000_003 + start) % (1 << 63))
    else:
        torch.manual_seed(cfg.seed + info.rank)  # dropout noise differs per rank
    stream = BatchStream(shards.tokens("train"), shards.n_px, cfg.batch_size, cfg.seed, info.rank, info.world_size)
    val = shards.tokens("val") if "val" in shards.splits else None
    if val is not None and (min(cfg.eval_images, len(val)) if cfg.eval_images else len(val)) < info.world_size:
        if info.is_main and len(val):
            print(f"validation skipped: fewer val images than the {info.world_size} ranks", flush=True)
        val = None  # an empty val split (prepare --val-fraction 0) has no loss to report, not a loss of 0
    end = cfg.stop_at or cfg.steps
    log = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out, (CONFIG_FILE, METRICS, PLOT))  # from a process killed mid-write
        resolved = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "world_size": info.world_size,
                    "micro_batch_size": micro, "accumulation": accum, "dtype": dtype_name(dtype),
                    "device": device.type, "igpt_version": __version__, "shards": shards.meta}
        atomic_write_bytes(out / CONFIG_FILE, (json.dumps(resolved, indent=2) + "\n").encode())
        log = RunLog(out, start, cfg.steps, cfg.progress)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    T = mcfg.seq_len
    losses, vals, last = {}, {}, resume  # a run already at its end returns the checkpoint it resumed from
    # throughput over training time only: t0 starts the current stretch of steps, busy holds the earlier
    # stretches of this logging interval (validation passes and checkpoints between them do not count)
    t0, tok0, busy = time.perf_counter(), 0, 0.0
    began = time.monotonic()
    try:
        for step in range(start, end):
            n = step + 1  # optimizer steps done after this one
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            pixels, mask, scored = stream.batch_at(step, cfg.objective, cfg.bert_mask_prob, cfg.augment)  # (b, T)
            check_ids(pixels.numpy(), mcfg.palette_size)
            pixels = pixels.to(device)
            total = torch.zeros((), device=device)
            for k in range(accum):
                sl = slice(k * micro, (k + 1) * micro)
                # a micro-batch weighs by its share of the images the global batch's loss averages over (the
                # gradients are then averaged over ranks): 1 / accum for AR; for BERT the images with a masked
                # pixel, which vary, so equal weights made 1 and W ranks (or micro-batch sizes) train apart
                D.grad_sync(wrapped, k == accum - 1)
                with autocast():
                    loss = micro_loss(wrapped, pixels[sl], None if mask is None else mask[sl].to(device), mcfg)
                part = loss / accum if mask is None else \
                    loss * (scored_images(pixels[sl], mask[sl]) * info.world_size / max(scored, 1))
                part.backward()
                total += part.detach()
            gnorm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip or float("inf"))
            gn = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP: a DTensor
            # one collective (and one host sync) per step: the loss, the gradient norm (the same on every rank)
            # and whether any rank has run past the time limit (so that every rank stops at the same step)
            late = cfg.time_limit is not None and n < end and time.monotonic() - began >= cfg.time_limit
            reduced = D.all_reduce_sum(torch.stack([total, gn.to(total.dtype), total.new_tensor(float(late))]))
            loss_sum, gn_sum, n_late = reduced.tolist()
            loss_val, gn_val = loss_sum / info.world_size, gn_sum / info.world_size  # global batch mean; the norm
            if not math.isfinite(loss_val):
                raise IgptError(f"non-finite loss ({loss_val}) at step {n}; stopped before the optimizer step "
                                f"(the latest checkpoint is the last good one)")
            if not math.isfinite(gn_val):  # a finite loss can still overflow a gradient: never step on it
                raise IgptError(f"non-finite gradient norm ({gn_val}) at step {n}; stopped before the optimizer "
                                f"step (the latest checkpoint is the last good one)")
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[n] = loss_val
            tok0 += cfg.batch_size * T
            if n_late > 0:
                end = n
                if info.is_main:
                    print(f"time limit of {cfg.time_limit:g} s reached: stopping at step {n} of {cfg.steps}",
                          flush=True)
            if log is not None:
                log.advance()
            if n % cfg.log_every == 0 or n == end:
                now = time.perf_counter()
                if log is not None:
                    log.log({"step": n, "tokens": n * cfg.batch_size * T, "loss": loss_val, "bits": bits(loss_val),
                             "lr": lr, "grad_norm": gn_val, "tokens_per_s": tok0 / (busy + now - t0)})
                t0, tok0, busy = now, 0, 0.0  # the time spent logging counts in the next interval
            paused, stop = False, time.perf_counter()
            if val is not None and ((cfg.eval_every and n % cfg.eval_every == 0) or n == cfg.steps):
                v = evaluate(wrapped, val, mcfg, cfg, micro, device, autocast)
                vals[n] = v
                best = v if best is None else min(best, v)
                if log is not None:
                    log.log({"step": n, "val_loss": v, "val_bits": bits(v), "best_val_loss": best})
                paused = True
            if (cfg.save_every and n % cfg.save_every == 0) or n == end:
                if log is not None:
                    log.sync()
                last = _save(wrapped, opt, full, mcfg, shards, cfg, n, best, ckpt_root, device, dtype, identity)
                paused = True
            if paused:
                if log is not None:
                    log.plot()
                busy += stop - t0
                t0 = time.perf_counter()  # throughput counts training time only
            if n == end:
                break
    finally:
        if log is not None:
            log.close()
    return {"losses": losses, "val": vals, "model": model, "checkpoint": last, "step": max(start, end)}


def _check_same_run(out: Path, resume: Path) -> None:
    """An explicit --resume DIR into an --out that holds a run: it must be the checkpoint's own run (the
    settings that shape a run equal, the data compared by content when resuming), else its metrics and
    checkpoints would mix with the other run's. A damaged or missing file is left to the loading that follows."""
    try:
        run = read_json(out / CONFIG_FILE) if (out / CONFIG_FILE).is_file() else {}
        state = read_json(resume / "train_state.json")
        there, ours = run.get("train"), state.get("train_config")
    except (IgptError, AttributeError):
        return
    if not isinstance(there, dict) or not isinstance(ours, dict):
        return
    differ = sorted(k for k in ours if k not in RESUMABLE_CHANGES and k != "data" and there.get(k) != ours[k])
    if "dtype" in differ and run.get("dtype") is not None and run.get("dtype") == state.get("dtype"):
        differ.remove("dtype")  # the words differ (auto, then fp32 on a resume), the precision trained in is one
    if differ:
        raise IgptError(f"--resume {resume}: {out} holds another run (its {', '.join(differ)} differ from the "
                        "checkpoint's); choose another --out")


def shards_identity(shards) -> dict:
    """What a resume must find unchanged in the training data, whatever path names it: the palette (its
    hash), the split sizes, the resolution and a fingerprint of the train and val tokens (64 evenly spaced
    rows of each: shards prepared with another seed, or other images of the same count, have the same
    palette and sizes). The path alone let other shards at the same path resume (other token meanings,
    another data order) and refused the same shards given by another path."""
    return {"palette_sha256": shards.palette.hash, "counts": dict(shards.meta["counts"]), "n_px": shards.n_px,
            "tokens_sample_sha256": {s: tokens_fingerprint(shards.tokens(s)) for s in ("train", "val")
                                     if s in shards.splits}}


def tokens_fingerprint(tokens, rows: int = 64) -> str:
    """sha256 of ``rows`` evenly spaced rows of a token array (cheap on a memory map of any size)."""
    idx = eval_rows(len(tokens), min(rows, len(tokens)))
    return hashlib.sha256(np.ascontiguousarray(tokens[idx]).tobytes()).hexdigest()[:16]


def _save(wrapped, opt, full, mcfg, shards, cfg, n, best, ckpt_root, device, dtype, identity: dict) -> Path:
    """Gather full states on every rank (collective), rank 0 writes, everyone waits for the rename."""
    info = D.get_dist_info()
    mstate, ostate = get_state_dict(wrapped, opt, options=full)
    rngs = D.gather_objects(rng_state(device))
    path = ckpt_root / f"step-{n:06d}"
    error = None
    if info.is_main:
        meta = {"step": n, "tokens_seen": n * cfg.batch_size * mcfg.seq_len, "samples_seen": n * cfg.batch_size,
                "world_size": info.world_size, "best_val_loss": best, "train_config": cfg.to_dict(),
                "model_config": mcfg.to_dict(), "shards": identity, "dtype": dtype_name(dtype),
                "igpt_version": __version__}
        try:
            save_train_checkpoint(ckpt_root, mstate, mcfg, shards.palette, ostate, rngs, meta, cfg.keep)
        except OSError as e:  # disk full, read-only or vanished directory; the previous checkpoints are intact
            prev = latest_checkpoint(ckpt_root)
            error = (f"cannot write checkpoint {path} ({e.strerror or e}); training stopped at step {n}; "
                     + (f"the last good checkpoint is {prev}" if prev else "no earlier checkpoint exists"))
    errors = D.gather_objects(error)  # instead of a barrier: every rank learns that rank 0 failed, and stops
    if errors[0] is not None:
        raise IgptError(errors[0])
    return path
