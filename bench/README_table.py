"""Render the README's performance table from the JSON that bench/run.py prints.

  .venv/bin/python bench/run.py > bench.json && .venv/bin/python bench/run.py --markdown bench.json
"""

from __future__ import annotations

# case -> (what it measures, unit, ours key, reference, target as (ratio key, minimum) or None)
ROWS = {
    "train_s32": ("training, 32x32, n_embd 256, 8 layers, batch 8, fp32", "tokens/s", "tok_s", "HF ImageGPT"),
    "train_t16": ("training, 16x16, n_embd 128, 4 layers, batch 32, fp32", "tokens/s", "tok_s", "HF ImageGPT"),
    "train_s32_bf16": ("training, 32x32 as above, bf16 autocast", "tokens/s", "tok_s", "HF ImageGPT"),
    "sample_t16_b8": ("complete bottom half of 16x16, batch 8", "images/s", "images_s", "HF generate"),
    "sample_t16_b64": ("complete bottom half of 16x16, batch 64", "images/s", "images_s", "HF generate"),
    "sample_s32_b8": ("sample whole 32x32, batch 8", "images/s", "images_s", "HF generate"),
    "quantize": ("quantize 32x32 RGB to 512 colours", "images/s", "images_s", "HF image processor"),
    "palette_fit": ("fit 512-colour palette, 1M pixels", "s", "seconds", "sklearn MiniBatchKMeans"),
    "probe_fit": ("logistic-regression probe fit", "s", "seconds", "sklearn LogisticRegression"),
}
TARGETS = {  # case -> [(label, key, op, bound)]
    "train_s32": [("speed >= 3.5x", "ratio", ">=", 3.5), ("MFU >= 80% of fp32 peak", "mfu", ">=", 0.8),
                  ("memory <= 1/3", "memory_ratio", "<=", 1 / 3)],
    "train_t16": [("speed >= 2x", "ratio", ">=", 2.0)],
    "train_s32_bf16": [("MFU >= 50% of bf16 peak (where bf16 is faster)", "mfu", ">=", 0.5)],
    "sample_t16_b8": [("speed >= 2.5x", "ratio", ">=", 2.5)],
    "sample_s32_b8": [("speed >= 2.5x", "ratio", ">=", 2.5)],
    "quantize": [("speed >= 50x", "ratio", ">=", 50.0)],
    "palette_fit": [("no slower", "ratio", ">=", 1.0), ("inertia no worse", "inertia_ratio", "<=", 1.0)],
}


def _num(v) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def bf16_slower(res: dict) -> bool:
    """True when this run's bf16 matmul peak is below its fp32 peak: a CPU without native bf16 (no avx512_bf16 /
    AMX) emulates it, so the bf16 target, which holds "where bf16 is faster", does not apply (and an MFU over
    the emulated peak says nothing about the hardware)."""
    mp = res.get("matmul_peak") or {}
    try:
        return mp["bf16"]["gflops"] < mp["fp32"]["gflops"]
    except (KeyError, TypeError):
        return False


def targets(res: dict) -> list[tuple[str, str, float | None, bool | str | None]]:
    """[(case, target label, measured value, met)] for every target whose case is in ``res``; met is None when
    the case failed or did not run, and "n/a" for the bf16 target on a CPU where bf16 is slower (bf16_slower)."""
    out = []
    for case, checks in TARGETS.items():
        for label, key, op, bound in checks:
            v = res.get(case, {}).get(key)  # None when the case failed or was not run
            met = None if v is None else (v >= bound if op == ">=" else v <= bound)
            if case == "train_s32_bf16" and met is not None and bf16_slower(res):
                met = "n/a"
            if case in res:
                out.append((case, label, v, met))
    return out


def _met(met) -> str:
    if met == "n/a":
        return "n/a: bf16 is slower than fp32 on this CPU (no native bf16)"
    return "-" if met is None else "yes" if met else "no"


def markdown(res: dict) -> str:
    """The README table: one row per case present in ``res``, then the matmul peak and the targets."""
    lines = ["| case | ours | reference | ratio (higher is better) | other |", "|---|---:|---:|---:|---|"]
    for case, (what, unit, key, ref_name) in ROWS.items():
        c = res.get(case)
        if not c:
            continue
        if "error" in c:
            lines.append(f"| {what} ({unit}) | failed: {c['error'][:80]} | | | |")
            continue
        if case == "palette_fit":
            what = f"fit {c['k']}-colour palette, {c['pixels']:,} pixels"
        other = []
        if "mfu" in c:
            other.append(f"MFU {c['mfu']:.0%} (ref {c['mfu_reference']:.0%})")
        if "memory_ratio" in c:
            other.append(f"memory {c['ours']['peak_mb_above_import']:,.0f} / "
                         f"{c['reference']['peak_mb_above_import']:,.0f} MB ({c['memory_ratio']:.2f}x)")
        if "inertia_ratio" in c:
            other.append(f"inertia {c['ours']['inertia']:,.0f} / {c['reference']['inertia']:,.0f}")
        if case == "quantize":
            if "warm_unseen_images_s" in c["ours"]:  # from a fresh table (the ratio); the other figure beside it
                other.append(f"fresh table; {_num(c['ours']['warm_unseen_images_s'])} images/s on unseen images "
                             f"with the table filled by others ({c['ratio_warm_unseen']:.1f}x)")
            else:  # results written before 2026-11-27's fix timed the warm pass over the same images
                other.append(f"cold table {_num(c['ours']['cold_images_s'])} images/s")
        oc = c.get("others_cores", {}).get("max")
        if oc is not None:
            other.append(f"others_cores <= {oc:.2f}")
        lines.append(f"| {what} ({unit}) | {_num(c['ours'][key])} | {_num(c['reference'][key])} ({ref_name}) "
                     f"| {c['ratio']:.2f}x | {'; '.join(other)} |")
    mp = res.get("matmul_peak")
    if mp:
        lines += ["", f"Matmul peak on this machine ({res.get('machine', {}).get('cpu', '?')}, "
                      f"{mp['threads']} threads): {mp['fp32']['gflops']:.0f} GFLOP/s fp32, "
                      f"{mp['bf16']['gflops']:.0f} GFLOP/s bf16."]
    t = targets(res)
    if t:
        lines += ["", "| target | measured | met |", "|---|---:|---|"]
        lines += [f"| {case}: {label} | {'-' if v is None else f'{v:.4g}'} | "
                  f"{_met(met)} |" for case, label, v, met in t]
    return "\n".join(lines)
