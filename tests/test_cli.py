"""The command line: help for every command, one-line errors with a non-zero exit, prepare end to end."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from igpt.cli import build_parser, main
from igpt.errors import IgptError


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "igpt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(sub.choices)


def required_args(name: str) -> list[str]:
    """A placeholder value for each argument the command's parser requires (positionals and required flags)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[name]
    out = []
    for a in sub._actions:
        if a.option_strings and a.required:
            out += [a.option_strings[0], "x"]
        elif not a.option_strings and a.nargs != 0:
            out.append("x")
    return out


def test_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for name in commands():
        assert name in r.stdout


@pytest.mark.parametrize("name", commands())
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0 and "usage: igpt " + name in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["prepare", "--data", "no/such/place", "--out", "o"], "no such file or folder"),
    (["prepare", "--palette", "missing.npy", "--out", "o"], "palette file not found"),
    (["prepare", "--palette", "x.npy", "--palette-size", "8", "--out", "o"], "--palette-size only applies"),
    (["prepare", "--n-px", "1", "--out", "o"], "n_px must be"),
    (["probe", "--checkpoint", "c", "--data", "d", "--out", "o", "--cs", "1,a"],
     "--cs must be comma-separated numbers, got '1,a'"),
    (["probe", "--checkpoint", "c", "--data", "d", "--out", "o", "--labels-per-class", "4,x"],
     "--labels-per-class must be comma-separated integers, got '4,x'"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("igpt: error: ") and message in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", sorted(set(commands()) - {"train", "eval"}))
def test_single_process_commands_refuse_to_run_under_torchrun(name, tmp_path, monkeypatch, capsys):
    """Every rank of `torchrun -m igpt probe` ran the whole probe into the same files (the feature cache's
    temporaries included); the commands that do not share their work over ranks now stop at once."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([name, *required_args(name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"igpt: error: `igpt {name}` runs in one process; launch it without torchrun (only `igpt train` "
                   "and `igpt eval` use several ranks)"]
    assert list(tmp_path.iterdir()) == []


def test_prepare_command_end_to_end(tmp_path):
    r = run("prepare", "--data", "fashion-mnist-mini", "--n-px", "12", "--palette-size", "8", "--out",
            str(tmp_path / "sh"))
    assert r.returncode == 0, r.stderr
    assert "train 7200, val 800, test 2000" in r.stdout
    for split in ("train", "val", "test"):
        t = np.load(tmp_path / "sh" / f"{split}_tokens.npy", mmap_mode="r")
        assert t.dtype == np.uint16 and t.shape[1] == 144 and int(t.max()) < 8
        assert len(np.load(tmp_path / "sh" / f"{split}_labels.npy")) == len(t)
    assert {"palette.npy", "palette.json", "meta.json"} <= {p.name for p in (tmp_path / "sh").iterdir()}
    # the shards' own meta.json repeats the run: the same palette and the same tokens
    r = run("prepare", "--config", str(tmp_path / "sh" / "meta.json"), "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    for name in ("palette.npy", "train_tokens.npy", "val_tokens.npy", "test_labels.npy"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "sh" / name).read_bytes(), name


def test_sigterm_ends_a_command_through_its_cleanup(tmp_path):
    """SIGTERM (a scheduler's or `kill`'s default) ended the process at once, so an interrupted prepare left its
    temporary shard folder for good; now it raises in the main thread, the ``finally`` blocks run and the exit
    status is 143 with one line. In-process callers of main() get their own handler back."""
    import signal
    import time

    cmd = [sys.executable, "-m", "igpt", "prepare", "--data", "fashion-mnist-mini", "--n-px", "12",
           "--palette-size", "8", "--out", str(tmp_path / "sh")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".sh.*.tmp")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "prepare ended before its temporary folder appeared"
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 143 and err.strip() == "igpt: terminated (SIGTERM)", (p.returncode, err)
    assert list(tmp_path.iterdir()) == []  # no temporary folder, no half-written shards
    before = signal.getsignal(signal.SIGTERM)
    assert main(["datasets"]) == 0 and signal.getsignal(signal.SIGTERM) is before


def test_the_error_path_imports_nothing():
    """A Ctrl-C or SIGTERM while a command imported torch reached ``failed()``, which imported igpt.distributed,
    and with it torch again over the half-imported one: a segfault (exit -11) or a traceback (exit 1) instead of
    130 / 143 (reproduced by signalling `igpt prepare` 0.6-2.0 s after its start). It now imports nothing."""
    code = ("import sys; from igpt.cli import failed; assert failed(130) == 130; "
            "print(sorted(m for m in ('torch', 'igpt.distributed') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.returncode, r.stdout, r.stderr)


def test_import_export_and_sample_commands(tmp_path):
    import torch
    from igpt_testutil import hf_model, rgb_palette
    from transformers import ImageGPTForCausalImageModeling, ImageGPTImageProcessorPil

    ref = hf_model(8, 24, 2, 3, 16, seed=1).eval()
    ref.save_pretrained(tmp_path / "hf")
    ImageGPTImageProcessorPil(clusters=rgb_palette(16)).save_pretrained(tmp_path / "hf")
    r = run("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    assert "2 layers, 24 wide, 3 heads, 8x8" in r.stdout and "palette 16" in r.stdout
    r = run("export-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf2"))
    assert r.returncode == 0, r.stderr
    back = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf2").eval()
    x = torch.randint(0, 17, (2, 64))
    with torch.no_grad():
        assert torch.allclose(back(x).logits, ref(x).logits, atol=1e-5)
    r = run("sample", "--checkpoint", str(tmp_path / "ck"), "--n", "3", "--out", str(tmp_path / "g.png"),
            "--top-k", "1", "--tokens-out", str(tmp_path / "t.npy"))
    assert r.returncode == 0, r.stderr
    t = np.load(tmp_path / "t.npy")
    assert t.shape == (3, 64) and (tmp_path / "g.png").stat().st_size > 0
    assert (t == t[0]).all()  # greedy: every sample is the same image
    r = run("sample", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "g.png"), "--rows", "2")
    assert r.returncode == 2 and r.stderr.strip() == "igpt: error: --rows needs --complete-from"
    r = run("sample", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "g.png"), "--cuda-graph",
            "--device", "cpu")
    assert r.returncode == 2 and r.stderr.strip() == "igpt: error: --cuda-graph needs a CUDA device, not cpu"
    r = run("import-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "ck2"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_train_command_and_python_m_igpt(tmp_path):
    r = run("prepare", "--data", "fashion-mnist-mini", "--n-px", "8", "--palette-size", "8", "--out",
            str(tmp_path / "sh"))
    assert r.returncode == 0, r.stderr
    args = ["train", "--data", str(tmp_path / "sh"), "--preset", "tiny", "--steps", "3", "--batch-size", "4",
            "--out", str(tmp_path / "run"), "--save-every", "2", "--log-every", "1", "--eval-images", "8",
            "--warmup", "1"]
    r = subprocess.run([sys.executable, "-m", "igpt", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "step 3: loss" in r.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert {"config.json", "metrics.jsonl", "loss.png"} <= {p.name for p in (tmp_path / "run").iterdir()}
    r = run("train", "--data", str(tmp_path / "sh"), "--preset", "tiny", "--batch-size", "6", "--micro-batch-size",
            "4", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "not divisible by ranks x micro_batch_size" in r.stderr
    assert not (tmp_path / "bad").exists()


def _train_config_of(monkeypatch, argv: list[str]):
    """The TrainConfig that `igpt train ARGV` would train with (the training itself replaced)."""
    import igpt.train

    seen = {}
    monkeypatch.setattr(igpt.train, "train", lambda cfg: seen.setdefault("cfg", cfg) and {"losses": {}, "step": 0})
    assert main(["train", *argv]) == 0
    return seen["cfg"]


def test_train_settings_file_then_flags_then_defaults(tmp_path, monkeypatch):
    from igpt.train_config import TrainConfig

    toml = tmp_path / "run.toml"
    toml.write_text('data = "shards"\nsteps = 700\nlr = 0.002\nbetas = [0.9, 0.99]\naugment = true\n'
                    "[model_overrides]\nn_layer = 3\n")
    cfg = _train_config_of(monkeypatch, ["--config", str(toml), "--steps", "900", "--n-embd", "48"])
    assert (cfg.data, cfg.steps, cfg.lr, cfg.betas, cfg.augment) == ("shards", 900, 0.002, (0.9, 0.99), True)
    assert cfg.model_overrides == {"n_layer": 3, "n_embd": 48}  # the flag adds to the file's table
    assert cfg.batch_size == TrainConfig.batch_size and cfg.warmup == TrainConfig.warmup  # neither sets them
    # a flag equal to TrainConfig's default still wins over the file
    assert _train_config_of(monkeypatch, ["--config", str(toml), "--lr", "1e-3"]).lr == 1e-3
    # an on/off setting of the file can be switched off by a flag (only the --augment form existed)
    assert _train_config_of(monkeypatch, ["--config", str(toml), "--no-augment"]).augment is False
    assert _train_config_of(monkeypatch, ["--config", str(toml), "--no-compile", "--no-fsdp"]).compile is False
    # a run's own config.json (train + model sections) repeats that run; JSON gives lists for tuples
    run_json = tmp_path / "config.json"
    run_json.write_text(json.dumps({"train": cfg.to_dict(), "model": {"n_layer": 3}, "world_size": 1}))
    again = _train_config_of(monkeypatch, ["--config", str(run_json), "--out", str(tmp_path / "again")])
    assert again.to_dict() == {**cfg.to_dict(), "out": str(tmp_path / "again")}


@pytest.mark.parametrize("command, module, cls", [("train", "igpt.train_config", "TrainConfig"),
                                                   ("finetune", "igpt.finetune", "FinetuneConfig"),
                                                   ("demo", "igpt.demo", "DemoConfig"),
                                                   ("probe", "igpt.probe", "ProbeConfig"),
                                                   ("prepare", "igpt.prepare", "PrepareConfig"),
                                                   ("eval", "igpt.evaluate", "EvalConfig")])
def test_help_defaults_are_the_config_defaults(command, module, cls):
    """The commands with --config take their defaults from the config dataclass; the help texts that state a
    default must state that one."""
    import importlib

    config = getattr(importlib.import_module(module), cls)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    checked = 0
    for action in sub._actions:
        m = re.search(r"[(;] ?default ([^)]+)\)", action.help or "")
        if not m or action.dest == "help" or action.default is not None or not hasattr(config, action.dest):
            continue  # (probe's --cs is parsed into the field Cs; the test below covers it)
        said, default = re.split(r"[,;:]", m.group(1))[0].strip(), getattr(config, action.dest)
        if default is None:  # the help describes what None chooses
            continue
        if isinstance(default, bool):
            assert said == ("on" if default else "off"), action.dest
        elif isinstance(default, (int, float)):
            assert float(said) == default, action.dest
        else:
            assert said == str(default), action.dest
        checked += 1
    assert checked >= {"train": 15, "finetune": 8, "demo": 8, "probe": 5, "prepare": 8, "eval": 4}[command]


def test_finetune_and_demo_settings_files(tmp_path, monkeypatch):
    import igpt.demo
    import igpt.finetune

    seen = []
    monkeypatch.setattr(igpt.finetune, "finetune", lambda cfg: seen.append(cfg) or {
        "stopped_early": False, "best_step": 1, "val_accuracy": 0.5, "test_accuracy": 0.5, "out_checkpoint": "c"})
    monkeypatch.setattr(igpt.demo, "run_demo", seen.append)
    ft = tmp_path / "ft.toml"
    ft.write_text('checkpoint = "ck"\ndata = "sh"\nout = "o"\nlambda_gen = 0.0\nweight_decay = 0.1\n')
    assert main(["finetune", "--config", str(ft), "--lr", "1e-4"]) == 0
    c = seen[-1]
    assert (c.checkpoint, c.data, c.out, c.lambda_gen, c.weight_decay, c.lr, c.steps) == ("ck", "sh", "o", 0.0, 0.1,
                                                                                      1e-4, 1000)
    record = tmp_path / "finetune.json"  # what a finetune run writes: its settings under "config"
    record.write_text(json.dumps({"test_accuracy": 0.5, "config": {**vars(c), "out": "o2"}}))
    assert main(["finetune", "--config", str(record)]) == 0
    assert vars(seen[-1]) == {**vars(c), "out": "o2"}
    demo = tmp_path / "demo.json"
    demo.write_text(json.dumps({"minutes": 3, "n_px": 8, "augment": False, "samples": 4}))
    assert main(["demo", "--config", str(demo), "--n-px", "10"]) == 0
    d = seen[-1]
    assert (d.minutes, d.n_px, d.augment, d.samples, d.out, d.batch_size) == (3, 10, False, 4, "runs/demo", 16)


def test_probe_settings_file_and_its_list_flags(tmp_path, monkeypatch):
    import igpt.probe

    seen = []
    monkeypatch.setattr(igpt.probe, "run_probe", lambda cfg: seen.append(cfg) or {
        "best_layer": 1, "C": 1.0, "val_accuracy": 0.5, "test_accuracy": 0.5, "baseline_test_accuracy": 0.5,
        "warnings": []})
    f = tmp_path / "p.toml"
    f.write_text('checkpoint = "ck"\ndata = "sh"\nout = "o"\nCs = [0.5, 5]\nlabels_per_class = [4, 10]\n'
                 "seeds = 3\n")
    assert main(["probe", "--config", str(f), "--labels-per-class", "25", "--concat", "1"]) == 0
    c = seen[-1]
    assert (c.Cs, c.labels_per_class, c.seeds, c.concat, c.layers) == ((0.5, 5.0), (25,), 3, 1, "all")
    assert main(["probe", "--config", str(f), "--cs", "0.1,1"]) == 0 and seen[-1].Cs == (0.1, 1.0)
    record = tmp_path / "probe.json"  # what a probe run writes: its settings under "config"
    record.write_text(json.dumps({"test_accuracy": 0.5, "config": dataclasses.asdict(c)}))
    assert main(["probe", "--config", str(record)]) == 0 and seen[-1] == c


def test_prepare_and_eval_settings_files(tmp_path, monkeypatch, capsys):
    import igpt.evaluate
    import igpt.prepare
    from igpt.evaluate import EvalConfig
    from igpt.prepare import PrepareConfig

    seen = []
    monkeypatch.setattr(igpt.prepare, "prepare", lambda cfg: seen.append(cfg) or {
        "source": "s", "counts": {"train": 1}, "n_px": cfg.n_px, "channels": 1, "palette_size": 4,
        "palette_fit": None, "skipped": []})
    f = tmp_path / "prep.toml"
    f.write_text('data = "mnist"\nn_px = 12\npalette_size = 8\npixels = false\n')
    assert main(["prepare", "--config", str(f), "--out", "sh", "--seed", "3"]) == 0
    c = seen[-1]
    assert (c.data, c.n_px, c.palette_size, c.pixels, c.seed, c.out) == ("mnist", 12, 8, False, 3, "sh")
    assert c.val_fraction == PrepareConfig.val_fraction and c.skip_bad is False  # the dataclass's defaults
    assert main(["prepare", "--out", "sh2", "--no-pixels", "--skip-bad"]) == 0
    assert (seen[-1].pixels, seen[-1].skip_bad, seen[-1].data) == (False, True, PrepareConfig.data)
    meta = tmp_path / "meta.json"  # a shard directory's record: its settings under "config"
    meta.write_text(json.dumps({"format": "igpt-shards", "n_px": 12, "config": dataclasses.asdict(c)}))
    assert main(["prepare", "--config", str(meta), "--out", "sh3"]) == 0
    assert seen[-1] == dataclasses.replace(c, out="sh3")
    # again with the palette that run fitted: its palette_size no longer applies (it was a contradiction error)
    assert main(["prepare", "--config", str(meta), "--palette", "sh/palette.npy", "--out", "sh4"]) == 0
    assert seen[-1] == dataclasses.replace(c, out="sh4", palette="sh/palette.npy", palette_size=None)
    assert main(["prepare", "--config", str(meta), "--palette", "p.npy", "--palette-size", "8", "--out", "o"]) == 2
    assert "--palette-size only applies to --palette fit" in capsys.readouterr().err  # both flags: still refused
    assert main(["prepare", "--data", "mnist"]) == 2
    assert "prepare: --out required" in capsys.readouterr().err

    monkeypatch.setattr(igpt.evaluate, "evaluate", lambda cfg: seen.append(cfg) or {
        "split": cfg.split, "nats_per_token": 1.0, "bits_per_token": 1.4, "images": 1, "images_scored": 1,
        "tokens_scored": 4, "tokens": "t", "out": "o"})
    e = tmp_path / "e.json"
    e.write_text(json.dumps({"nats_per_token": 1.0, "config": {"checkpoint": "ck", "data": "sh", "split": "val",
                                                                "out": None, "bert_mask_prob": 0.3}}))
    assert main(["eval", "--config", str(e), "--mask-prob", "0.5", "--batch-size", "8"]) == 0
    c = seen[-1]
    assert (c.checkpoint, c.data, c.split, c.bert_mask_prob, c.batch_size, c.seed) == ("ck", "sh", "val", 0.5, 8,
                                                                                       EvalConfig.seed)
    assert main(["eval", "--data", "sh"]) == 2
    assert "eval: --checkpoint required" in capsys.readouterr().err


@pytest.mark.parametrize("module, cls, required", [("igpt.train_config", "TrainConfig", {"data": "d"}),
                                                   ("igpt.prepare", "PrepareConfig", {"out": "o"}),
                                                   ("igpt.evaluate", "EvalConfig", {"checkpoint": "c", "data": "d"}),
                                                   ("igpt.finetune", "FinetuneConfig",
                                                    {"checkpoint": "c", "data": "d", "out": "o"}),
                                                   ("igpt.demo", "DemoConfig", {})])
def test_every_config_checks_its_seed(module, cls, required):
    """Seeds feed torch's 64-bit generators (combined with ranks and indices): a negative or huge one is a
    one-line config error, not a numpy / torch traceback later."""
    import importlib

    config = getattr(importlib.import_module(module), cls)
    config(**required, seed=2**62 - 1)
    for seed in (-1, 2**62, 2**64):
        with pytest.raises(IgptError, match=r"seed must be an integer in \[0, 2\^62\)"):
            config(**required, seed=seed)


def test_finetune_needs_checkpoint_data_and_out_from_somewhere(tmp_path, capsys):
    assert main(["finetune", "--data", "sh"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "igpt: error: finetune: --checkpoint, --out required (on the command line or in the --config file)"


@pytest.mark.parametrize("name, text, message", [
    ("a.toml", 'data = "s"\nstepz = 3\n', "unknown field(s) ['stepz']"),
    ("a.json", '{"data": "s", "lr": "0.1"}', "lr must be float, got '0.1'"),
    ("a.json", '{"data": "s", "steps": true}', "steps must be int, got True"),
    ("a.json", '{"data": "s", "betas": [0.9]}', "betas must be tuple[float, float]"),
    ("a.json", '{"data": "s", "model_overrides": 3}', "model_overrides must be"),
    ("a.toml", 'data = "s"\nsteps = \n', "not a readable TOML file"),
    ("a.json", "[1, 2]", "expected a table of settings, got list"),
    ("a.yaml", "data: s\n", "expected a .json or .toml file"),
    ("a.toml", "steps = 3\n", "--data required"),
    ("missing.json", None, "no such file"),
    ("a.json", '{"data": "s", "lr": 1' + "0" * 400 + "}", "lr must be float"),  # too large for a float
    ("a.toml", 'data = "s"\n[train]\nsteps = 3\n', "settings both at the top (data) and in a [train] table"),
])
def test_bad_settings_files_are_one_line_errors(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    extra = ["--n-layer", "2"] if "model_overrides" in (text or "") else []
    assert main(["train", "--config", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("igpt: error: ") and message in err[0], err


def test_eval_and_probe_commands(tmp_path, capsys, monkeypatch):
    import json

    from igpt_testutil import tiny_model
    from test_probe import write_shards

    from igpt.checkpoint import save_model
    from igpt.palette import Palette

    sh = write_shards(tmp_path / "sh")
    ck = save_model(tmp_path / "ck", tiny_model(n_px=4, palette_size=6), Palette.load(sh / "palette.npy"))
    r = run("eval", "--checkpoint", str(ck), "--data", str(sh), "--out", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    assert "nats/token" in r.stderr and "bits/token" in r.stderr  # the human line; stdout is the JSON
    e = json.loads((tmp_path / "e.json").read_text())
    assert json.loads(r.stdout) == {**e, "out": str(tmp_path / "e.json")}
    assert e["images_scored"] == e["images"] and e["tokens_scored"] == e["images"] * e["tokens_per_image"]
    assert e["bits_per_token"] == pytest.approx(e["nats_per_token"] / np.log(2))
    r = run("probe", "--checkpoint", str(ck), "--data", str(sh), "--out", str(tmp_path / "p"), "--layers", "0,2",
            "--labels-per-class", "2,5", "--seeds", "2", "--cs", "0.1,1", "--cache")
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert {"per_layer", "best_layer", "test_accuracy", "baseline_test_accuracy", "low_data"} <= set(p)
    assert [row["layer"] for row in p["per_layer"]] == [0, 2]
    assert [row["labels_per_class"] for row in p["low_data"]] == [2, 5]
    assert (tmp_path / "p" / "probe.png").is_file() and "best layer" in r.stdout
    assert (tmp_path / "p" / "features" / "test_layer2.npy").is_file()
    monkeypatch.chdir(tmp_path)
    for args, message in [
        (["eval", "--checkpoint", str(ck), "--data", str(tmp_path / "none")], "not a complete shard directory"),
        (["probe", "--checkpoint", str(ck), "--data", str(sh), "--out", "o", "--layers", "7"], "layers 0..2"),
        (["probe", "--checkpoint", str(ck), "--data", str(sh), "--out", "o", "--labels-per-class", "a"],
         "--labels-per-class must be"),
        (["probe", "--checkpoint", str(ck), "--data", str(sh), "--out", "o", "--labels-per-class", "50"],
         "fewer than 50"),
        (["eval", "--checkpoint", str(ck), "--data", str(sh), "--out", str(sh)], "is a folder; give the name of a"),
        (["sample", "--checkpoint", str(ck), "--n", "1", "--out", str(tmp_path / "s.png"), "--tokens-out",
          str(sh)], "is a folder"),
        (["eval", "--checkpoint", str(ck), "--data", str(sh), "--out", "/proc/igpt-test.json"],
         "/proc/igpt-test.json: "),  # a folder that takes no files: the OS's words, on one line
    ]:
        assert main(args) == 2  # in-process: the same handler as the console script, without a torch import each
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("igpt: error: ") and message in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_finetune_command(tmp_path, shards, capsys):
    import json

    from igpt_testutil import tiny_model

    from igpt.checkpoint import load_heads, save_model
    from igpt.shards import load_shards

    ck = save_model(tmp_path / "ck", tiny_model(n_px=8, palette_size=8), load_shards(shards).palette)
    args = ["finetune", "--checkpoint", str(ck), "--data", str(shards), "--out", str(tmp_path / "ft"), "--steps",
            "4", "--batch-size", "8", "--eval-every", "2", "--lambda-gen", "0.5", "--lr", "1e-3"]
    assert main(args) == 0  # in-process, as the eval/probe error checks above
    out = capsys.readouterr().out
    assert "best val step" in out and "test" in out
    res = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert [h["step"] for h in res["history"]] == [2, 4] and res["config"]["lambda_gen"] == 0.5
    assert load_heads(tmp_path / "ft" / "checkpoint")["score"].shape == (10, 24)
    for extra, message in [(["--steps", "0"], "steps must be"), (["--mask-ensemble", "5"], "BERT models only")]:
        assert main([*args, "--out", str(tmp_path / "o"), *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("igpt: error: ") and message in lines[0], lines
    assert not (tmp_path / "o").exists()
