"""The demo's reproduce commands and report with unusual settings (found by a review in the fifteenth session):
each command line, parsed by `igpt`, gives back the run's settings."""

import io
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

PREP = SimpleNamespace(n_px=12, palette_size=16, test_fraction=0.0)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _summary(data: str) -> dict:
    from igpt.demo import DemoConfig, commands

    cfg = DemoConfig(data=data, out="o", steps=10)
    acc = dict(probe_test_accuracy=0.8, baseline_test_accuracy=0.7, best_layer=1, concat_layers=[0, 1, 2],
               concat_probe_test_accuracy=0.81, baseline_native_test_accuracy=None, native_px=None)
    return {**acc, "data": data, "source": "folder", "counts": {"train": 10, "val": 2, "test": 2}, "n_px": 12,
            "palette_size": 16, "channels": 1, "model": dict(preset="tiny", n_layer=2, n_embd=24, n_head=3, params=1),
            "steps": 10, "steps_planned": 10, "stopped_by_time_limit": False, "stop_at": None, "batch_size": 16,
            "lr": 3e-3, "tokens_seen": 1, "tokens_per_s": None, "device": "cpu", "val_bits_per_token": 1.0,
            "val_nats_per_token": 0.7, "test_bits_per_token": 1.0, "test_nats_per_token": 0.7,
            "completions_keep_top_half": True, "completion_rows_given": 6, "wall_seconds": 1.0,
            "budget_seconds": 60.0, "stage_seconds": {"train": 1.0}, "peak_rss_mb": 1.0,
            "per_layer": [{"layer": 0, "val_accuracy": 0.5, "test_accuracy": 0.5}],
            "commands": commands(cfg, Path(cfg.out), PREP, 10, 10)}


def test_report_of_a_data_path_that_is_not_utf8(tmp_path):
    """On Linux a file name is bytes: sys.argv / os.listdir give an undecodable byte as a lone surrogate
    ('\\udcff'). render() keeps it, and write_report's str.encode() then raised UnicodeEncodeError (a
    traceback, no report) after the whole run: json.dumps (ensure_ascii) wrote summary.json fine."""
    from igpt.report import write_report

    data = "/data/caf\udce9-images"  # 'café' in Latin-1, as a UTF-8 system's Python sees it
    (tmp_path / "probe").mkdir()
    for name in ("probe/probe.png", "completions.png", "samples.png"):
        (tmp_path / name).write_bytes(_png())
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9, "val_loss": 1.0}]
    path = write_report(tmp_path, _summary(data), rows, np.zeros((16, 1), np.uint8))
    assert path.read_bytes().decode("utf-8", "replace").count("Image GPT on") == 1


def _parse_demo_line(line: str, monkeypatch):
    import igpt.demo as D
    from igpt.cli import main

    seen = {}
    monkeypatch.setattr(D, "run_demo", lambda cfg: seen.setdefault("cfg", cfg) and {})
    assert main(shlex.split(line)[1:]) == 0
    return seen["cfg"]


def test_reproduce_commands_keep_the_exact_learning_rate(monkeypatch):
    """f'{lr:g}' keeps 6 significant digits: --lr 0.0012345678 came back as 0.00123457 in the report's
    `igpt demo` and `igpt train` lines, which then train another model."""
    import igpt.train
    from igpt.cli import main
    from igpt.demo import DemoConfig, commands

    cfg = DemoConfig(lr=0.0012345678)
    lines = commands(cfg, Path("o"), PREP, 100, 100)
    assert _parse_demo_line(lines[0], monkeypatch).lr == cfg.lr
    seen = {}
    monkeypatch.setattr(igpt.train, "train", lambda c: seen.setdefault("cfg", c) and {"losses": {}, "step": 0})
    assert main(shlex.split(lines[2])[1:]) == 0
    assert seen["cfg"].lr == cfg.lr


def test_the_demo_command_keeps_settings_given_in_a_config_file(monkeypatch):
    """completions, per_image and samples (settable only in --config until the fifteenth session) were left out of
    the report's `igpt demo` line, so pasting it made 8 x 4 completions and 16 samples instead of the run's."""
    from igpt.demo import DemoConfig, commands

    cfg = DemoConfig(completions=2, per_image=3, samples=5)
    got = _parse_demo_line(commands(cfg, Path("o"), PREP, 100, 100)[0], monkeypatch)
    assert (got.completions, got.per_image, got.samples) == (2, 3, 5)


def test_reproduce_commands_with_a_data_path_that_starts_with_a_dash(monkeypatch, capsys):
    """`igpt demo --data=-odd.npz` runs; the report writes `--data -odd.npz`, which argparse reads as an
    unknown option: 'argument --data: expected one argument' (exit 2) when pasted."""
    from igpt.demo import DemoConfig, commands

    cfg = DemoConfig(data="-odd.npz")
    assert _parse_demo_line(commands(cfg, Path("o"), PREP, 100, 100)[0], monkeypatch).data == "-odd.npz"
