"""Sizing a run to a wall-time budget: ``step_seconds`` measures one training step and one forward pass of the
run's shape on a throw-away model; ``plan_steps`` turns a budget into a step count and a hard time limit for the
training loop, after what the later stages (features, NLL, sampling, probe fits) are estimated to need. Used by
`igpt demo` and ``bench/quality.py``.
"""

from __future__ import annotations

import statistics
import time

import torch

# wall time of a training-loop step over the bare step measured by step_seconds (median): measured 0.93-1.06 in
# 12x12 demo runs (validation passes, logging, the final checkpoint; the measurement itself tends to run slow);
# the loop's time limit stops a slower run, by then in the cosine schedule's near-zero tail
TRAIN_OVERHEAD = 1.0
RESERVE = 0.02  # share of the budget kept back for the report and a noisy machine
# seconds of the probe's logistic-regression fits per image and feature set (a layer, a concatenation, a pixel
# baseline), on 2 cores: the bundled 10,000 images x 8 sets took ~31 s in the 9-minute demo until the fifteenth
# session, 51-59 s since (the float64 objective sums stopped fits stopping falsely early; measured on the
# sixteenth session's demo model, cached features, Ice Lake): (55 - PROBE_FIXED_S) / 80,000
PROBE_FIT_S = 6.3e-4
# the probe's feature pass over the measured inference forward, per image: the demo's 10,000 images took ~48 s
# against 32 s from forward_s (sixteenth session: every layer's normed states pooled and copied out)
FEATURES_OVERHEAD = 1.5
# seconds of the probe's fits whatever their size: its fit batches (layers x C, refits, a concatenation, two
# baselines) each run up to 300 L-BFGS iterations of a few ms of fixed work. Measured on 2 cores (Ice Lake,
# quiet): the probe stage of 800 8x8 images took 6.3 s, of which the forward passes and the size term above give
# 2.0 s; the bundled demo's 71.5 s, 62 s (an overrun of 4 s in a 30 s demo, 3 s in 9 minutes, before this term)
PROBE_FIXED_S = 5.0


def step_seconds(mcfg, batch_size: int, lr: float, device: torch.device, repeats: int = 7,
                 compile: bool = False) -> tuple[float, float]:
    """Measured seconds of one training step (forward + backward + AdamW, in the train loop's dtype) and of
    one inference forward pass over ``batch_size`` images, on a throw-away model of the run's shape: the
    median of ``repeats`` after a warm-up (one slow repeat on a shared machine would cost the run steps, one
    fast one would buy steps the loop cannot run: the minimum of 5 once planned 47 ms for a 58 ms loop step;
    TRAIN_OVERHEAD covers the loop's extra cost). ``compile``: blocks compiled as ``igpt train --compile``
    does (the warm-up step then pays the compilation)."""
    from igpt.distributed import wrap_model
    from igpt.model import ImageGPT
    from igpt.train import fused_adamw, micro_loss, pick_dtype

    dtype = pick_dtype("auto", device)
    model = wrap_model(ImageGPT(mcfg).to(device), device, compile=compile)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused_adamw(device))
    x = torch.randint(0, mcfg.palette_size, (batch_size, mcfg.seq_len), device=device)

    def one_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            micro_loss(model, x, None, mcfg).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def one_forward():
        with torch.no_grad():
            model(x)

    times = {}
    for name, fn in (("step", one_step), ("forward", one_forward)):
        fn()  # warm-up
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        times[name] = statistics.median(ts)
    return times["step"], times["forward"]


MIN_STEPS = 20  # the fewest training steps a demo runs, whatever its budget


def plan_steps(budget_s: float, step_s: float, fwd_s: float, batch: int, n_eval_images: int, n_feature_images: int,
               n_sample_tokens: int, max_steps: int, n_fit_sets: int = 0) -> dict:
    """Steps that fit the budget. The rest of the run is estimated from the measured forward time: feature
    extraction and NLL are forward passes over the splits, sampling one forward step per token of the
    longest sequence (a KV cache makes that about a forward pass of one position per token); the probe's
    fits from their size (PROBE_FIT_S per image and feature set, plus PROBE_FIXED_S; features at FEATURES_OVERHEAD
    times a forward pass), plus a fixed share for
    the report and noise.
    ``later_s`` is that estimate: more than the budget means even the minimum of steps overruns it."""
    per_image_fwd = fwd_s / batch
    features = n_feature_images * per_image_fwd * FEATURES_OVERHEAD
    nll = n_eval_images * per_image_fwd
    sampling = n_sample_tokens * fwd_s / batch / 4  # decoding one row: ~a quarter of a full row's cost per token
    fits = n_feature_images * n_fit_sets * PROBE_FIT_S + (PROBE_FIXED_S if n_fit_sets else 0.0)
    fixed = RESERVE * budget_s
    left = budget_s - features - nll - sampling - fits - fixed
    # the loop costs more than the bare step: validation passes, checkpoints, logging (TRAIN_OVERHEAD)
    fit = left / (TRAIN_OVERHEAD * step_s)
    steps = int(min(max_steps, max(MIN_STEPS, fit)))
    # the loop may eat half the reserve, no more; a budget too small for the later stages trains its minimum of
    # steps, all of them (a time limit then stopped the first, slower steps short of it: 5 of 20)
    limit = None if fit < MIN_STEPS else left + fixed / 2
    return {"budget_s": budget_s, "step_s": step_s, "forward_s": fwd_s, "reserved_s": budget_s - left,
            "later_s": budget_s - left - fixed, "steps": steps, "time_limit_s": limit, "minimum": fit < MIN_STEPS}
