"""Kill `igpt train` at random moments and at every phase of a checkpoint write, resume with --resume auto,
and print JSON figures: resumes from the newest complete checkpoint, partial checkpoints loaded, and whether
the killed-and-resumed run ends bit-identical (parameters and optimizer state) to an uninterrupted one.

Usage: python bench/faults.py [--trials 40] [--steps 12] [--seed 0] [--launcher fork|exec] [--work DIR]

Each run is `igpt train` (tiny preset, save every step, dropout, augmentation) in a child process: `fork`
(default) forks this process, which has imported torch but computed nothing, and calls igpt.cli.main; `exec`
starts a fresh `python bench/faults.py child ...` (the real command-line start-up, ~4 s slower per run).
Half of the trials kill at a named point of a checkpoint save (the child sends itself SIGKILL there, via
wrappers installed in the child only: the library has no test hook), the other half at a random moment
(seeded). Nothing outside the child changes behaviour.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Where a checkpoint save can be cut short (train_state.save_train_checkpoint, igpt.io.atomic_dir):
POINTS = [
    "model",  # model.safetensors, config.json, palette.npy written into the temporary directory
    "optimizer",  # optimizer.pt written
    "rng",  # rng.pt written
    "state",  # train_state.json written (the directory is complete, not yet renamed into place)
    "renamed",  # the directory is in place, `latest` still names the previous one
    "latest-tmp",  # the new `latest` is written to its temporary file, not yet renamed
    "prune",  # `latest` updated; half-way through deleting the oldest checkpoint
]
FLAGS = ["--preset", "tiny", "--batch-size", "4", "--warmup", "2", "--lr", "3e-3", "--dtype", "fp32",
         "--dropout", "0.1", "--augment", "--save-every", "1", "--keep", "2", "--eval-every", "0",
         "--eval-images", "16", "--log-every", "1", "--no-progress"]
_STEP = re.compile(r"step-(\d+)")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(point: str, step: int) -> None:
    """In a child only: SIGKILL this process at ``point`` of the save of checkpoint ``step``."""
    import shutil

    import torch

    import igpt.io as io
    import igpt.train_state as TS

    def at(path) -> bool:
        m = _STEP.search(str(path))
        return m is not None and int(m.group(1)) == step

    real_write, real_save, real_replace, real_rmtree = TS.write_model_files, torch.save, os.replace, shutil.rmtree
    real_text = Path.write_text

    def write_model_files(folder, *a, **k):
        real_write(folder, *a, **k)
        if point == "model" and at(folder):
            _die()

    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if at(f) and Path(f).name == {"optimizer": TS.OPTIM_FILE, "rng": TS.RNG_FILE}.get(point):
            _die()

    def write_text(self, *a, **k):
        r = real_text(self, *a, **k)
        if point == "state" and self.name == TS.STATE_FILE and at(self):
            _die()
        return r

    def replace(src, dst, *a, **k):
        if point == "latest-tmp" and Path(dst).name == TS.LATEST and Path(dst).parent.joinpath(f"step-{step:06d}").is_dir():
            _die()
        real_replace(src, dst, *a, **k)
        if point == "renamed" and Path(src).name.startswith(".step-") and Path(src).name.endswith(".tmp") and at(dst):
            _die()

    def rmtree(path, *a, **k):
        latest = Path(path).parent / TS.LATEST
        if point == "prune" and latest.is_file() and latest.read_text().strip() == f"step-{step:06d}":
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            files[0].unlink()  # half-way: some files gone, some left
            _die()
        return real_rmtree(path, *a, **k)

    TS.write_model_files, torch.save, Path.write_text = write_model_files, save, write_text
    os.replace = io.os.replace = replace
    TS.shutil.rmtree = rmtree


def install_recorder(record: Path) -> None:
    """In a resuming child: note which checkpoint it loads and whether that directory was complete then."""
    import igpt.train as T

    real = T.load_train_checkpoint

    def load(path, *a, **k):
        record.write_text(json.dumps({"path": str(path), "valid": checkpoint_valid(Path(path))}))
        return real(path, *a, **k)

    T.load_train_checkpoint = load


def child(argv: list[str], kill: tuple[str, int] | None, record: Path | None, plot: bool = True) -> int:
    import torch

    torch.set_num_threads(1)  # the same arithmetic in every run, and 1-thread runs can go side by side
    from igpt.cli import main

    if not plot:  # loss.png costs ~0.15 s per checkpoint and touches no checkpoint file
        import igpt.train_log

        igpt.train_log.RunLog.plot = lambda self: None

    if kill is not None:
        install_kill(*kill)
    if record is not None:
        install_recorder(record)
    return main(["train", *argv])


def start(launcher: str, argv: list[str], log: Path, kill=None, record=None, plot=True) -> int | subprocess.Popen:
    """Start a training child; returns a pid (fork) or a Popen (exec)."""
    if launcher == "exec":
        cmd = [sys.executable, __file__, "child", str(record or ""), f"{kill[0]}:{kill[1]}" if kill else "",
               "plot" if plot else "no-plot", *argv]
        return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = child(argv, kill, record, plot)
        except BaseException:  # noqa: BLE001 - report and exit without running the parent's cleanup
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(proc, timeout: float | None = 300) -> int:
    """Exit status (negative: killed by that signal)."""
    if isinstance(proc, subprocess.Popen):
        return proc.wait(timeout)
    _, status = os.waitpid(proc, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill(proc) -> None:
    try:
        os.kill(proc.pid if isinstance(proc, subprocess.Popen) else proc, signal.SIGKILL)
    except ProcessLookupError:
        pass


def checkpoint_valid(path: Path) -> bool:
    """Checked independently of igpt: every file present and readable, the step matching the name."""
    from safetensors.numpy import load_file

    try:
        if not all((path / f).is_file() for f in ("model.safetensors", "config.json", "palette.npy",
                                                  "optimizer.pt", "rng.pt", "train_state.json")):
            return False
        load_file(str(path / "model.safetensors"))
        json.loads((path / "config.json").read_text())
        meta = json.loads((path / "train_state.json").read_text())
        return meta["step"] == int(_STEP.search(path.name).group(1))
    except Exception:  # noqa: BLE001 - anything unreadable is invalid
        return False


def newest_valid(root: Path) -> Path | None:
    found = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP.fullmatch(p.name)))
    good = [p for _, p in found if checkpoint_valid(p)]
    return good[-1] if good else None


def fingerprint(ckpt: Path) -> tuple[str, str]:
    """(hash of the parameters' bytes, hash of optimizer.pt's tensors' bytes)."""
    from safetensors.numpy import load_file

    params = load_file(str(ckpt / "model.safetensors"))
    hp = hashlib.sha256(b"".join(k.encode() + params[k].tobytes() for k in sorted(params))).hexdigest()
    import zipfile

    with zipfile.ZipFile(ckpt / "optimizer.pt") as z:  # tensor payloads; independent of pickling details
        ho = hashlib.sha256(b"".join(z.read(n) for n in sorted(z.namelist()) if "/data/" in n)).hexdigest()
    return hp, ho


def run_trials(shards: Path, work: Path, trials: int, steps: int, seed: int, launcher: str = "fork",
               jobs: int = 1, plot: bool = True) -> dict:
    """The reference run, then ``trials`` kill-and-resume trials (``jobs`` at a time); the figures as a dict."""
    work.mkdir(parents=True, exist_ok=True)
    argv = lambda out, *extra: ["--data", str(shards), "--out", str(out), "--steps", str(steps), *FLAGS, *extra]  # noqa: E731
    # the uninterrupted reference, timed so random kills can land anywhere in a run
    t0 = time.perf_counter()
    code = wait(start(launcher, argv(work / "ref"), work / "ref.log", plot=plot))
    duration = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"reference run failed:\n{(work / 'ref.log').read_text()[-2000:]}")
    ref = fingerprint(work / "ref" / "checkpoints" / f"step-{steps:06d}")
    rng = random.Random(seed)
    plans = []
    for i in range(trials):  # drawn up front, so the plan does not depend on jobs
        if i % 2 == 0:
            plans.append(("point", (POINTS[(i // 2) % len(POINTS)], rng.randint(3, steps))))  # last step too
        else:
            plans.append(("time", rng.uniform(0.1, 1.0) * duration))

    def trial(i: int) -> dict:
        out, rec = work / f"t{i}", work / f"t{i}.load.json"
        kind, arg = plans[i]
        if kind == "point":
            proc = start(launcher, argv(out), work / f"t{i}.log", kill=arg, plot=plot)
            how = f"at {arg[0]} of step {arg[1]}"
        else:
            proc = start(launcher, argv(out), work / f"t{i}.log", plot=plot)
            time.sleep(arg)
            kill(proc)
            how = f"after {arg:.2f} s"
        killed = wait(proc) == -signal.SIGKILL
        root = out / "checkpoints"
        leftovers = sorted(p.name for p in root.glob(".*")) if root.is_dir() else []
        expect = newest_valid(root) if root.is_dir() else None
        code = wait(start(launcher, argv(out, "--resume", "auto"), work / f"t{i}.resume.log", record=rec, plot=plot))
        loaded = json.loads(rec.read_text()) if rec.is_file() else None
        return {
            "trial": i, "kill": how, "killed": killed, "mid_save": kind == "point" or bool(leftovers),
            "newest_valid": expect.name if expect else None,
            "resumed_from": Path(loaded["path"]).name if loaded else None,
            "loaded_valid": loaded["valid"] if loaded else None,
            "resume_exit": code,
            "bit_identical": code == 0 and fingerprint(root / f"step-{steps:06d}") == ref,
            "leftovers_after": sorted(p.name for p in root.glob(".*")),
        }

    pids = []
    for j in range(jobs):  # each job a forked process running every jobs-th trial in turn
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                rows = [trial(i) for i in range(j, trials, jobs)]
                (work / f"rows{j}.json").write_text(json.dumps(rows))
                code = 0
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    if any(wait(pid, None) != 0 for pid in pids):
        raise SystemExit("a trial job failed")
    rows = sorted((r for j in range(jobs) for r in json.loads((work / f"rows{j}.json").read_text())),
                  key=lambda r: r["trial"])
    ok = [r for r in rows if r["resume_exit"] == 0 and r["resumed_from"] == r["newest_valid"]]
    return {
        "launcher": launcher, "trials": trials, "steps": steps, "seed": seed, "jobs": jobs, "plot": plot,
        "uninterrupted_run_s": round(duration, 2),
        "killed": sum(r["killed"] for r in rows),
        "killed_mid_save": sum(r["mid_save"] for r in rows),
        "resumed_from_newest_complete": len(ok),
        "partial_checkpoints_loaded": sum(r["loaded_valid"] is False for r in rows),
        "bit_identical_to_uninterrupted": sum(r["bit_identical"] for r in rows),
        "leftovers_after_resume": sum(bool(r["leftovers_after"]) for r in rows),
        "rows": rows,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":  # child RECORD KILL PLOT TRAIN-ARGS... (from start())
        record, spec, plot, *rest = sys.argv[2:]
        kill = (spec.split(":")[0], int(spec.split(":")[1])) if spec else None
        sys.exit(child(rest, kill, Path(record) if record else None, plot == "plot"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher", choices=("fork", "exec"), default="fork")
    p.add_argument("--jobs", type=int, default=1, help="trials run side by side (1 thread each)")
    p.add_argument("--no-plot", action="store_true", help="children skip loss.png (faster; checkpoints unchanged)")
    p.add_argument("--shards", help="token shards (default: prepare the bundled data at 8x8, 8 grey levels)")
    p.add_argument("--work", help="working directory (default: a temporary one, deleted)")
    p.add_argument("--rows", action="store_true", help="include the per-trial rows")
    a = p.parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot  # noqa: F401 - imported once here (nothing computed), so forked children start fast
    import torch  # noqa: F401

    import igpt.cli  # noqa: F401
    import igpt.train  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        shards = Path(a.shards) if a.shards else work / "shards"
        if not a.shards and wait(start_prepare(shards)) != 0:
            raise SystemExit("preparing the shards failed")
        t0 = time.perf_counter()
        res = run_trials(shards, work / "runs", a.trials, a.steps, a.seed, a.launcher, a.jobs, not a.no_plot)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        if not a.rows:
            res["rows"] = [r for r in res["rows"] if not (r["resume_exit"] == 0 and r["bit_identical"]
                                                         and r["resumed_from"] == r["newest_valid"])]
        print(json.dumps(res, indent=2))


def start_prepare(shards: Path):
    """Prepare the shards in a child, so this process computes nothing before forking."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from igpt.prepare import PrepareConfig, prepare

            prepare(PrepareConfig(out=str(shards), data="fashion-mnist-mini", n_px=8, palette_size=8))
            code = 0
        finally:
            os._exit(code)
    return pid


if __name__ == "__main__":
    main()
