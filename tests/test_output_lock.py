"""One process per output: a second igpt process given an output another is writing stops at once with one line
(igpt.io.output_lock), and nothing of the first run is touched."""

from __future__ import annotations

import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from igpt.demo import DemoConfig, run_demo
from igpt.errors import IgptError
from igpt.finetune import FinetuneConfig, finetune
from igpt.io import output_lock
from igpt.probe import ProbeConfig, run_probe
from igpt.train import train
from igpt.train_config import TrainConfig

HOLD = "import sys\nfrom igpt.io import output_lock\nwith output_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"


@contextmanager
def held_by_another_process(path: Path):
    """A second Python process holding output_lock(path) until the block ends; yields its pid."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p.pid
    finally:
        p.stdin.close()
        assert p.wait(timeout=60) == 0


def tiny_train(shards, out, **kw) -> TrainConfig:
    base = dict(data=str(shards), preset="tiny", out=str(out), steps=4, batch_size=8, warmup=1, dtype="fp32",
                eval_every=0, save_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


def test_a_second_training_into_a_run_folder_in_use_stops_and_touches_nothing(shards, tmp_path):
    out = tmp_path / "run"
    train(tiny_train(shards, out, stop_at=2))  # interrupted at step 2 of 4
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with held_by_another_process(out) as pid:
        with pytest.raises(IgptError, match=rf"{re.escape(str(out))}: another igpt process \(pid {pid} on \S+\) is "
                                            "writing this output; wait for it to end or choose another --out"):
            train(tiny_train(shards, out, resume="auto"))
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
        r = subprocess.run([sys.executable, "-m", "igpt", "train", "--data", str(shards), "--preset", "tiny",
                            "--out", str(out), "--steps", "4", "--resume", "auto", "--warmup", "1", "--no-progress"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert re.fullmatch(rf"igpt: error: {re.escape(str(out))}: another igpt process \(pid {pid} on \S+\) is "
                            "writing this output; wait for it to end or choose another --out\n", r.stderr), r.stderr
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    res = train(tiny_train(shards, out, resume="auto"))
    assert sorted(res["losses"]) == [3, 4]  # free again: it resumed from step 2


@pytest.mark.parametrize("run", ["probe", "finetune", "demo"])
def test_probe_finetune_and_demo_lock_their_output_before_any_work(tmp_path, run):
    """The lock comes first: with the output held, even settings that name no data stop on it (and the old
    demo folder is not removed)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the other process's\n")
    start = {"probe": lambda: run_probe(ProbeConfig(checkpoint="nope", data="nope", out=str(out))),
             "finetune": lambda: finetune(FinetuneConfig(checkpoint="nope", data="nope", out=str(out))),
             "demo": lambda: run_demo(DemoConfig(out=str(out), data="nope"))}[run]
    with held_by_another_process(out):
        with pytest.raises(IgptError, match="another igpt process .* is writing this output"):
            start()
    assert (out / "keep.txt").read_text() == "the other process's\n"
    with pytest.raises(IgptError) as e:  # free again: now the settings are read (and refused)
        start()
    assert "another igpt process" not in str(e.value)


def test_the_lock_is_released_on_error_and_a_symlink_locks_the_folder_it_names(tmp_path):
    out = tmp_path / "real"
    with pytest.raises(IgptError, match="boom"), output_lock(out):
        raise IgptError("boom")
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    with held_by_another_process(link), pytest.raises(IgptError, match="another igpt process"), output_lock(out):
        pass
    with output_lock(link):  # released when the holder ended
        assert (tmp_path / ".real.lock").is_file()  # beside the folder, not inside it
    assert not out.exists()  # locking makes no output folder


def test_only_rank_zero_of_a_torchrun_job_locks(tmp_path, monkeypatch):
    """The ranks of one job share their outputs: ranks other than 0 neither lock nor wait."""
    out = tmp_path / "run"
    with held_by_another_process(out):
        monkeypatch.setenv("RANK", "1")
        with output_lock(out):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(IgptError, match="another igpt process"), output_lock(out):
            pass
