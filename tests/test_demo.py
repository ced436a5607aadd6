"""`igpt demo` end to end on a small labelled data set with a reduced budget, and the report in a real browser."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt.cli import main
from igpt.datasets import open_source
from igpt.demo import DemoConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    """600 train + 200 test images of the bundled Fashion-MNIST subset, as an .npz a user might bring."""
    src = open_source("fashion-mnist-mini")
    x, y = next(src.splits["train"].chunks(800))
    path = tmp_path_factory.mktemp("npz") / "small.npz"
    np.savez(path, x_train=x[:600, ..., 0], y_train=y[:600], x_test=x[600:800, ..., 0], y_test=y[600:800])
    return path


@pytest.fixture(scope="session")
def demo_run(small_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    argv = ["demo", "--data", str(small_npz), "--out", str(out), "--minutes", "0.5", "--n-px", "8",
            "--palette-size", "8", "--preset", "tiny", "--seed", "3"]
    assert main(argv) == 0
    return out, argv


def _png(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    return im


def test_demo_writes_every_artefact_with_real_numbers(demo_run, capsys):
    out, _ = demo_run
    s = json.loads((out / "summary.json").read_text())
    for key in ("probe_test_accuracy", "baseline_test_accuracy", "probe_val_accuracy", "baseline_val_accuracy"):
        assert 0.0 <= s[key] <= 1.0 and s[key] > 0.2, key  # 10 classes: chance is 0.1
    assert s["best_layer"] in range(0, 3)  # the tiny preset has 2 layers: 0..2
    assert len(s["per_layer"]) == 3
    assert s["counts"] == {"train": 540, "val": 60, "test": 200}
    # an untrained 8-colour model scores log2(8) = 3 bits; training must have gone below it
    assert 0.0 < s["val_bits_per_token"] < 3.0 and 0.0 < s["test_bits_per_token"] < 3.0
    assert math.isclose(s["val_bits_per_token"], s["val_nats_per_token"] / math.log(2))
    assert s["wall_seconds"] > 0 and s["steps"] >= 1 and s["tokens_per_s"] > 0
    assert s["steps"] <= s["steps_planned"] and s["stopped_by_time_limit"] == (s["steps"] < s["steps_planned"])
    assert s["completions_keep_top_half"] is True
    assert s["native_px"] == 28 and 0.2 < s["baseline_native_test_accuracy"] <= 1.0  # the source's 28x28 pixels
    assert "before quantization" in s["baseline_input"]
    probe = json.loads((out / "probe" / "probe.json").read_text())
    assert probe["test_accuracy"] == s["probe_test_accuracy"] and probe["best_layer"] == s["best_layer"]
    # the concatenated-layers probe: layers best-2 .. best+2 that exist (0..2 here), its own numbers
    assert s["concat_layers"] == [i for i in range(s["best_layer"] - 2, s["best_layer"] + 3) if 0 <= i <= 2]
    assert probe["concat"]["test_accuracy"] == s["concat_probe_test_accuracy"] > 0.2
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and rows[-1]["step"] == s["steps"]
    comp = _png(out / "completions.png")
    samples = _png(out / "samples.png")
    cell = 8 * (128 // 8) + 2  # 8x8 images drawn 16x larger, 2 px apart
    assert comp.size == (6 * cell + 2, 8 * cell + 2)  # 8 test images x [original | top half | 4 completions]
    assert samples.size == (4 * cell + 2, 4 * cell + 2)  # 16 samples in a 4 x 4 grid
    assert (out / "model" / "model.safetensors").is_file()


def test_report_holds_the_numbers_images_and_commands(demo_run):
    out, _ = demo_run
    s = json.loads((out / "summary.json").read_text())
    page = (out / "report.html").read_text()
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [a for a, _ in imgs] == ["loss curve", "probe accuracy by layer", "completions", "samples"]
    for _, data in imgs:
        Image.open(io.BytesIO(base64.b64decode(data))).load()  # each embedded image decodes
    assert f"{100 * s['probe_test_accuracy']:.1f}%" in page
    assert f"{100 * s['baseline_test_accuracy']:.1f}%" in page
    assert f"{100 * s['concat_probe_test_accuracy']:.1f}%" in page
    assert f"{s['val_bits_per_token']:.3f} bits per token" in page
    assert f"{s['wall_seconds']:.0f} s (budget {s['budget_seconds']:.0f} s)" in page  # the page's number is summary's
    assert page.count('class="sw"') == s["palette_size"]
    for cmd in s["commands"]:
        assert cmd.replace("'", "&#x27;") in page
    assert s["commands"][0].startswith("igpt demo ") and f"--steps {s['steps_planned']}" in s["commands"][0]
    assert {"--augment", "0.003"} <= set(s["commands"][0].split())  # the defaults (augment, lr 3e-3), spelt out


def test_demo_refuses_a_foreign_output_folder(demo_run, tmp_path, capsys):
    out, argv = demo_run
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    i = argv.index("--out")
    assert main([*argv[:i + 1], str(foreign), *argv[i + 2:]]) == 2
    assert "igpt did not write" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_demo_rejects_unlabelled_or_too_small_data_before_removing_an_old_demo(tmp_path, capsys):
    """Labels and split sizes were checked after prepare, so an old demo in --out was deleted first."""
    old = tmp_path / "o"  # an earlier demo's folder (it holds the demo's marker)
    old.mkdir()
    (old / "demo.json").write_text(json.dumps({"config": asdict(DemoConfig())}))
    (old / "report.html").write_text("the previous demo")
    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    assert main(["demo", "--data", str(tmp_path / "x.npy"), "--out", str(old), "--minutes", "0.2",
                 "--preset", "tiny", "--n-px", "8"]) == 2
    assert "class labels" in capsys.readouterr().err
    # labelled, but too few images to hold out val and test
    np.savez(tmp_path / "three.npz", x=x[:3], y=np.arange(3))
    assert main(["demo", "--data", str(tmp_path / "three.npz"), "--out", str(old), "--minutes", "0.2",
                 "--preset", "tiny", "--n-px", "8"]) == 2
    assert "too few images for the demo's splits (train 3, val 0, test 0" in capsys.readouterr().err
    np.savez(tmp_path / "few.npz", x=x, y=np.arange(40) % 4)  # 4 test images for 8 completions
    assert main(["demo", "--data", str(tmp_path / "few.npz"), "--out", str(old), "--minutes", "0.2",
                 "--preset", "tiny", "--n-px", "8"]) == 2
    assert "4 test images, fewer than the 8 completions" in capsys.readouterr().err
    assert (old / "report.html").read_text() == "the previous demo"
    # a folder whose demo.json is not one of ours (a bare "config" key marked it): refused, kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "demo.json").write_text('{"config": {"title": "my own demo"}}')
    (mine / "index.html").write_text("my page")
    assert main(["demo", "--out", str(mine), "--minutes", "0.2"]) == 2
    assert "igpt did not write" in capsys.readouterr().err and (mine / "index.html").is_file()
    assert not (old / "run").exists()


def _browser():
    """A headless Debian chromium driven through chromedriver, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver on this machine (Debian: apt-get install chromium chromium-driver); "
                    "the report's browser check did not run")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,2400"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_report_renders_in_a_headless_browser(demo_run, tmp_path):
    out, _ = demo_run
    browser = _browser()
    try:
        browser.get((out / "report.html").resolve().as_uri())
        assert browser.execute_script("return document.readyState") == "complete"
        assert browser.title == "igpt demo report"
        imgs = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        assert [i[0] for i in imgs] == ["loss curve", "probe accuracy by layer", "completions", "samples"]
        for alt, complete, w, h in imgs:
            assert complete and w > 0 and h > 0, f"{alt} did not render"
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        swatches = browser.execute_script("return document.querySelectorAll('.sw').length")
        assert swatches == json.loads((out / "summary.json").read_text())["palette_size"]
        assert browser.save_screenshot(str(tmp_path / "report.png"))
        assert _png(tmp_path / "report.png").width > 0
    finally:
        browser.quit()


def test_report_calls_a_difference_within_one_standard_error_a_tie():
    from igpt.report import noise_note

    # 2,000 test images at 82.4%: one standard error is sqrt(0.824 * 0.176 / 2000) = 0.85 points
    assert "within one standard error" in noise_note(0.825, 0.824, 2000)
    assert "±0.9 points" in noise_note(0.818, 0.824, 2000)
    assert noise_note(0.834, 0.824, 2000) == "" and noise_note(0.814, 0.824, 2000) == ""
    assert noise_note(0.825, 0.824, 1_000_000) == ""  # a large test set resolves 0.1 points


def test_commands_of_a_run_stopped_by_the_time_limit_reproduce_it():
    from types import SimpleNamespace

    from igpt.demo import DemoConfig, commands

    prep = SimpleNamespace(n_px=12, palette_size=16, test_fraction=0.0)
    full = commands(DemoConfig(), Path("runs/demo"), prep, 500, 500)
    cut = commands(DemoConfig(), Path("runs/demo"), prep, 500, 321)
    assert "--stop-at" not in " ".join(full) and "step-000500" in full[3]
    assert cut[2].endswith("--stop-at 321") and "--steps 500" in cut[2]  # the same schedule, stopped where it was
    assert all("step-000321" in c for c in cut[3:]) and "--steps 500 --stop-at 321" in cut[0]
    assert "--stop-at" not in full[0] and cut[-1].endswith("--out runs/demo/stages/samples.png")  # samples.png too


def test_the_demo_command_of_a_stopped_run_stops_where_it_did(monkeypatch, tmp_path):
    """The report's first line (`igpt demo ... --steps N`) trained all N planned steps where the time limit had
    stopped the run at M: it now says --stop-at M, which trains to M on the schedule of N."""
    import shlex
    from types import SimpleNamespace

    import igpt.demo as D
    from igpt.demo import DemoConfig, commands

    line = commands(DemoConfig(seed=4), Path("o"), SimpleNamespace(n_px=12, palette_size=16, test_fraction=0.0),
                    500, 321)[0]
    seen = {}
    monkeypatch.setattr(D, "run_demo", lambda cfg: seen.setdefault("cfg", cfg) and {})
    assert main(shlex.split(line)[1:]) == 0
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.stop_at, cfg.seed) == (500, 321, 4)
    tc = D._train_config(cfg, Path("s"), Path("r"), cfg.steps, None)
    assert (tc.steps, tc.stop_at, tc.warmup) == (500, 321, 50)  # the schedule of 500, stopped at 321
    with pytest.raises(Exception, match="--stop-at needs --steps"):
        DemoConfig(stop_at=5)
    with pytest.raises(Exception, match=r"stop_at must be an integer in \[1, steps = 10\]"):
        DemoConfig(steps=10, stop_at=11)


def test_demo_settings_that_fail_later_fail_first(small_npz, tmp_path, capsys):
    """A typo in --data deleted the previous demo before the error; too many completions for the test split
    failed after training and probing; the largest seed passed the check, then overflowed the samples' seed."""
    from igpt.demo import sample_seed

    old = tmp_path / "old"
    old.mkdir()
    (old / "demo.json").write_text(json.dumps({"config": asdict(DemoConfig())}))
    (old / "report.html").write_text("the previous demo")
    assert main(["demo", "--data", str(tmp_path / "typo.npz"), "--out", str(old), "--minutes", "0.2"]) == 2
    assert "typo.npz" in capsys.readouterr().err and (old / "report.html").read_text() == "the previous demo"
    cfg = tmp_path / "c.json"
    cfg.write_text('{"completions": 300}')  # the small set has 200 test images
    assert main(["demo", "--config", str(cfg), "--data", str(small_npz), "--out", str(tmp_path / "d"), "--steps",
                 "2", "--n-px", "8", "--palette-size", "8", "--preset", "tiny"]) == 2
    assert "200 test images, fewer than the 300 completions" in capsys.readouterr().err
    assert not (tmp_path / "d" / "run").exists()  # refused before training
    assert sample_seed(2**62 - 1) == 0 and sample_seed(3) == 4


def test_the_train_command_trains_with_the_demos_settings(monkeypatch):
    """The report's `igpt train` line, parsed by the real CLI, gives the TrainConfig the demo trained with
    (bookkeeping included: evaluation interval and size make the report's loss curve), but for the demo's
    time limit and progress bar."""
    import shlex
    from types import SimpleNamespace

    import igpt.train
    from igpt.cli import main
    from igpt.demo import DemoConfig, _train_config, commands

    cfg = DemoConfig()
    out = Path("runs/demo")
    line = commands(cfg, out, SimpleNamespace(n_px=12, palette_size=16, test_fraction=0.0), 9399, 9399)[2]
    seen = {}
    monkeypatch.setattr(igpt.train, "train", lambda c: seen.setdefault("cfg", c) and {"losses": {}, "step": 0})
    assert main(shlex.split(line)[1:]) == 0
    want = _train_config(cfg, out / "stages" / "shards", out / "stages" / "run", 9399, None).to_dict()
    got = seen["cfg"].to_dict()
    assert {k: v for k, v in got.items() if k != "progress"} == {k: v for k, v in want.items() if k != "progress"}


def test_a_symlinked_out_replaces_the_demo_it_points_to(small_npz, tmp_path):
    """`--out LINK` to an old demo: rmtree refused the link ('Cannot call rmtree on a symbolic link', no path);
    as for every --out, the folder it names is replaced and the link kept."""
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "demo.json").write_text(json.dumps({"config": asdict(DemoConfig())}))
    (real / "stale.txt").write_text("from an earlier demo")
    link.symlink_to(real)
    assert main(["demo", "--data", str(small_npz), "--out", str(link), "--steps", "2", "--n-px", "8",
                 "--palette-size", "8", "--preset", "tiny"]) == 0
    assert link.is_symlink() and (real / "report.html").is_file() and not (real / "stale.txt").exists()
