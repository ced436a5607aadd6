"""The demo's report: one self-contained HTML page (every image embedded as a data URI) from a run's summary.

Sections: headline numbers, loss curve (bits per token, train and val), probe accuracy by layer with the
raw-pixel baseline, completions, samples, the palette as swatches, a table of the numbers, the commands.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from igpt.io import atomic_write_bytes
from igpt.train_log import loss_png


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def swatches(colours: np.ndarray) -> str:
    """The palette as small coloured squares (grey palettes repeat the level in R, G and B)."""
    c = colours if colours.shape[1] == 3 else np.repeat(colours, 3, axis=1)
    return "".join(f'<span class="sw" title="{i}: rgb({r},{g},{b})" style="background:rgb({r},{g},{b})"></span>'
                   for i, (r, g, b) in enumerate(c.tolist()))


def noise_note(probe: float, baseline: float, n_test: int) -> str:
    """A sentence when probe and baseline accuracies differ by less than one standard error of an accuracy on
    ``n_test`` images (sqrt(p (1 - p) / n)), else ''."""
    se = math.sqrt(max(baseline * (1 - baseline), 1e-12) / max(n_test, 1))
    if abs(probe - baseline) >= se:
        return ""
    return (f" The {100 * abs(probe - baseline):.1f}-point difference is within one standard error of an accuracy "
            f"on {n_test:,} test images (±{100 * se:.1f} points): a tie, not a win or a loss.")


def render(s: dict, colours: np.ndarray, images: dict[str, bytes]) -> str:
    e = html.escape
    beat = s["probe_test_accuracy"] > s["baseline_test_accuracy"]
    m = s["model"]
    verdict = "" if beat else (
        " Here the pretrained features do not beat raw pixels: after minutes of pretraining a small model has "
        "learnt mostly local pixel statistics, and mean pooling over positions discards the layout that raw "
        "pixels keep. The paper's probes beat pixels with far larger models trained for far longer.")
    tie = noise_note(s["probe_test_accuracy"], s["baseline_test_accuracy"], s["counts"]["test"])
    verdict += tie
    tone = "" if tie else ("good" if beat else "bad")
    concat = "" if not s.get("concat_layers") else (
        f" Concatenating the features of layers {s['concat_layers'][0]}-{s['concat_layers'][-1]} (the paper's trick) "
        f"gives {_pct(s['concat_probe_test_accuracy'])}.")
    table = [
        ("data", f"{s['data']} ({s['source']})"),
        ("images", ", ".join(f"{k} {v:,}" for k, v in s["counts"].items())),
        ("resolution / palette", f"{s['n_px']}x{s['n_px']}, {s['palette_size']} colours "
                                 f"({'RGB' if s['channels'] == 3 else 'grey'})"),
        ("model", f"{m['preset']}: {m['n_layer']} layers, {m['n_embd']} wide, {m['n_head']} heads, "
                  f"{m['params']:,} parameters"),
        ("training", f"{s['steps']} steps x {s['batch_size']} images, lr {s['lr']:g}, "
                     f"{s['tokens_seen']:,} tokens"
                     + (f" (stopped by the time limit; {s['steps_planned']} planned)"
                        if s.get("stopped_by_time_limit") else
                        f" (stopped at --stop-at on the schedule of {s['steps_planned']})"
                        if s.get("stop_at") and s["steps"] < s["steps_planned"] else "")),
        ("training speed", "–" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f} tokens/s on {s['device']}"),
        ("val NLL", f"{s['val_bits_per_token']:.4f} bits/token ({s['val_nats_per_token']:.4f} nats)"),
        ("test NLL", f"{s['test_bits_per_token']:.4f} bits/token ({s['test_nats_per_token']:.4f} nats)"),
        ("best probe layer (chosen on val)", str(s["best_layer"])),
        ("probe test accuracy", _pct(s["probe_test_accuracy"])),
        *([(f"layers {s['concat_layers'][0]}-{s['concat_layers'][-1]} concatenated (the paper's trick): probe test "
            "accuracy", _pct(s["concat_probe_test_accuracy"]))] if s.get("concat_layers") else []),
        ("raw-pixel baseline test accuracy", _pct(s["baseline_test_accuracy"])
         + ("" if s.get("baseline_native_test_accuracy") is None else
            f" ({_pct(s['baseline_native_test_accuracy'])} at the source's {s['native_px']}x{s['native_px']})")),
        ("completions keep the given top half", "yes" if s["completions_keep_top_half"] else "NO"),
        ("wall time", f"{s['wall_seconds']:.0f} s (budget {s['budget_seconds']:.0f} s): "
                      + ", ".join(f"{k} {v:.0f} s" for k, v in s["stage_seconds"].items())),
        ("peak memory", f"{s['peak_rss_mb']:.0f} MB resident"),
    ]
    layer_rows = "".join(f"<tr><td>{r['layer']}</td><td>{_pct(r['val_accuracy'])}</td><td>{_pct(r['test_accuracy'])}"
                         f"</td></tr>" for r in s["per_layer"])
    cmds = "\n".join(e(c) for c in s["commands"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>igpt demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }} .lead {{ font-size: 1.15em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1.5em; }} figure {{ margin: 0; }}
figcaption {{ color: #555; font-size: 0.9em; max-width: 560px; }}
img {{ max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; }} td, th {{ border-bottom: 1px solid #eee; padding: 0.25em 0.8em; text-align: left; }}
.sw {{ display: inline-block; width: 18px; height: 18px; margin: 1px; border: 1px solid #ccc; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
.good {{ color: #16702b; }} .bad {{ color: #a11; }}
</style></head><body>
<h1>Image GPT on {e(s['data'])}</h1>
<p class="lead">A {m['params']:,}-parameter GPT trained for {s['steps']} steps to predict the next pixel reaches
<b>{s['val_bits_per_token']:.3f} bits per token</b> on validation images. A linear probe on its layer {s['best_layer']}
features classifies test images with <b class="{tone}">{_pct(s['probe_test_accuracy'])}</b>
accuracy, against {_pct(s['baseline_test_accuracy'])} for the same classifier on raw pixels.{verdict}{concat}</p>
<div class="grid">
<figure>{_img(images['loss'], 'loss curve')}<figcaption>Loss in bits per token: training batches and the
validation split.</figcaption></figure>
<figure>{_img(images['probe'], 'probe accuracy by layer')}<figcaption>Linear-probe accuracy by layer (the layer is
chosen on validation, never on test); dashed: the raw-pixel baseline on the same split.</figcaption></figure>
</div>
<h2>Completions</h2>
<figure>{_img(images['completions'], 'completions')}<figcaption>Each row: a test image, its top
{s['completion_rows_given']} rows as given to the model, then completions sampled from the model.</figcaption></figure>
<h2>Samples</h2>
<figure>{_img(images['samples'], 'samples')}<figcaption>Unconditional samples (temperature 1).</figcaption></figure>
<h2>Palette</h2>
<p>{s['palette_size']} colours fitted by k-means on training pixels; every pixel is one of these tokens.</p>
<div>{swatches(colours)}</div>
<h2>Numbers</h2>
<table>{''.join(f'<tr><th>{e(k)}</th><td>{e(v)}</td></tr>' for k, v in table)}</table>
<h3>Probe accuracy by layer</h3>
<table><tr><th>layer</th><th>val</th><th>test</th></tr>{layer_rows}</table>
<h2>Reproduce</h2>
<p>The whole run, then the same stages one by one (they write under <code>OUT/stages</code>):</p>
<pre>{cmds}</pre>
</body></html>
"""


def write_report(out: Path, summary: dict, rows: list[dict], colours: np.ndarray) -> Path:
    """OUT/report.html from the summary, the run's metrics rows and the palette colours (uint8 (k, C))."""
    images = {"loss": loss_png(rows, in_bits=True), "probe": (out / "probe" / "probe.png").read_bytes(),
              "completions": (out / "completions.png").read_bytes(), "samples": (out / "samples.png").read_bytes()}
    path = out / "report.html"
    atomic_write_bytes(path, render(summary, colours, images).encode("utf-8", "backslashreplace"))
    return path
