"""`igpt demo` edge cases found by a review in the sixteenth session: input refused only after the old demo in
--out was deleted (some of it after the whole training budget), a traceback, a NaN plan, and a reproduce
command that does not run."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from igpt.cli import main
from igpt.demo import DemoConfig

SMALL = ["--steps", "2", "--n-px", "8", "--preset", "tiny"]


def _old_demo(tmp_path: Path) -> Path:
    """An earlier demo's folder (it holds the demo's marker) with a report the user wants to keep."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "demo.json").write_text(json.dumps({"config": asdict(DemoConfig())}))
    (old / "report.html").write_text("the previous demo")
    return old


def _images(n: int = 200, colour: bool = False) -> np.ndarray:
    shape = (n, 8, 8, 3) if colour else (n, 8, 8)
    return np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the demo gets as far as training (the refusal must come before the budget is spent)."""
    import igpt.train

    def train(cfg):
        raise AssertionError("the demo trained before refusing its input")

    monkeypatch.setattr(igpt.train, "train", train)


def test_a_test_label_outside_the_train_and_val_classes_is_refused_before_training(tmp_path, capsys, no_training):
    """An .npz whose test split has a class that train and val lack: the probe refuses it ('test label 2 is
    outside the 2 classes of train and val'), but only at stage 4, after the whole training budget, and by then
    the old demo in --out had been deleted."""
    x = _images()
    data = tmp_path / "unseen.npz"
    np.savez(data, x_train=x[:150], y_train=np.arange(150) % 2, x_test=x[150:], y_test=np.full(50, 2))
    old = _old_demo(tmp_path)
    assert main(["demo", "--data", str(data), "--out", str(old), "--palette-size", "8", *SMALL]) == 2
    assert "test label 2 is outside the 2 classes" in capsys.readouterr().err
    assert (old / "report.html").read_text() == "the previous demo"


def test_a_grey_palette_over_256_colours_keeps_the_old_demo(tmp_path, capsys, no_training):
    """--palette-size 300 on grey data: prepare refuses it ('grey data has at most 256 distinct levels'), which
    the demo could know from the source's channels before decoding, but the old demo was already deleted."""
    data = tmp_path / "grey.npz"
    np.savez(data, x=_images(), y=np.arange(200) % 2)
    old = _old_demo(tmp_path)
    assert main(["demo", "--data", str(data), "--out", str(old), "--palette-size", "300", *SMALL]) == 2
    assert "at most 256 distinct levels" in capsys.readouterr().err
    assert (old / "report.html").read_text() == "the previous demo"


def test_a_palette_larger_than_the_datas_colours_keeps_the_old_demo(tmp_path, capsys, no_training):
    """Colour data with fewer distinct colours than --palette-size: refused by the palette fit, after decoding
    (so not before the old demo could be removed); a refused run must still leave it in place."""
    data = tmp_path / "colour.npz"
    np.savez(data, x=_images(colour=True), y=np.arange(200) % 2)
    old = _old_demo(tmp_path)
    assert main(["demo", "--data", str(data), "--out", str(old), "--palette-size", "20000", *SMALL]) == 2
    assert "distinct colours, fewer than the palette size 20000" in capsys.readouterr().err
    assert (old / "report.html").read_text() == "the previous demo"


def test_a_batch_too_large_for_memory_is_one_line_and_keeps_the_old_demo(tmp_path, capsys, no_training):
    """--batch-size 10^11: step_seconds (the budget's step measurement, before `igpt train`'s own memory check)
    allocated the batch and raised RuntimeError 'DefaultCPUAllocator: can't allocate memory' as a traceback,
    after the old demo was deleted."""
    data = tmp_path / "grey.npz"
    np.savez(data, x=_images(), y=np.arange(200) % 2)
    old = _old_demo(tmp_path)
    assert main(["demo", "--data", str(data), "--out", str(old), "--batch-size", str(10**11), *SMALL]) == 2
    assert "memory" in capsys.readouterr().err
    assert (old / "report.html").read_text() == "the previous demo"


def test_minutes_whose_seconds_overflow_are_refused_up_front(tmp_path, capsys, no_training):
    """--minutes 1e307 passed the finite check, but minutes * 60 is inf: the plan's arithmetic made NaN
    (inf - inf), it 'planned' the minimum of 20 steps with a NaN time limit, and TrainConfig then refused
    'time_limit must be a finite number of seconds > 0, got nan' (a setting the user never gave), after the old
    demo was deleted."""
    data = tmp_path / "grey.npz"
    np.savez(data, x=_images(), y=np.arange(200) % 2)
    old = _old_demo(tmp_path)
    assert main(["demo", "--data", str(data), "--out", str(old), "--minutes", "1e307", "--n-px", "8",
                 "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "--minutes" in err and "nan" not in err
    assert (old / "report.html").read_text() == "the previous demo"


def test_data_with_a_single_class_is_refused_before_training(tmp_path, capsys, no_training):
    """Every label the same: the demo trained, then reported probe 100.0% vs raw pixels 100.0% (a linear probe
    of one class cannot be wrong) as its headline, a comparison that measures nothing."""
    data = tmp_path / "one.npz"
    np.savez(data, x=_images(), y=np.zeros(200, int))
    old = _old_demo(tmp_path)
    assert main(["demo", "--data", str(data), "--out", str(old), *SMALL]) == 2
    assert "class" in capsys.readouterr().err
    assert (old / "report.html").read_text() == "the previous demo"


@pytest.mark.slow
def test_the_reports_stage_commands_run_as_written(tmp_path, capsys):
    """The report's 'same stages one by one' write into the demo's own folders: `igpt train --out OUT/run`
    then refuses ('already holds a run with checkpoints; continue it with --resume auto'), so the stage lines
    cannot reproduce the run as printed (the later lines silently reuse the demo's checkpoint)."""
    data = tmp_path / "grey.npz"
    np.savez(data, x=_images(), y=np.arange(200) % 2)
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(data), "--out", str(out), "--palette-size", "8", *SMALL]) == 0
    cmds = json.loads((out / "summary.json").read_text())["commands"]
    capsys.readouterr()
    for line in cmds[1:3]:  # prepare, then train
        assert main(shlex.split(line)[1:]) == 0, (line, capsys.readouterr().err)


def test_a_train_split_of_one_class_is_refused_before_training_even_when_val_has_two():
    """The probe refuses train labels of one class (igpt.shards.check_two_classes); the demo's own check had
    looked at train and val together, so a second class in val alone let training run and the probe refuse."""
    from types import SimpleNamespace

    from igpt.demo import DemoConfig, check_classes
    from igpt.errors import IgptError

    labels = {"train": np.zeros(50, int), "val": np.array([0, 1]), "test": np.array([0, 1])}
    shards = SimpleNamespace(labels=labels.__getitem__, meta={"class_names": ["a", "b"]})
    with pytest.raises(IgptError, match="two classes in train"):
        check_classes(DemoConfig(), shards)
    labels["train"] = np.array([0, 1] * 25)
    check_classes(DemoConfig(), shards)  # two classes in train: accepted
