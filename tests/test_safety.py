"""Untrusted files never run code: a pickle whose __reduce__ would create a marker file, planted as a CIFAR batch,
a pytorch_model.bin, an object .npy (data, palette, shards) and a training checkpoint's optimizer / RNG state, is
refused with an IgptError and the marker never appears. The source holds no eval/exec and no unsafe loader,
and ruff's S rules (make lint) fail on one."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt.errors import IgptError

SRC = Path(__file__).resolve().parents[1] / "src" / "igpt"


class Boom:
    """Unpickling this runs `touch MARKER` (os.system), unless the loader refuses it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a planted pickle ran code"


def test_boom_really_would_run(tmp_path):
    """The payload works when unpickled naively, so the refusals below mean something."""
    m = tmp_path / "ran"
    pickle.loads(pickle.dumps(Boom(m)))  # noqa: S301
    assert m.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batch(tmp_path, marker, protocol):
    from igpt.cifar import cifar_source, read_cifar_batch

    f = tmp_path / "data_batch_1"
    f.write_bytes(pickle.dumps({b"data": Boom(marker), b"labels": [0]}, protocol=protocol))
    with pytest.raises(IgptError, match="data_batch_1: not a valid CIFAR python batch .*posix.system.* not allowed"):
        read_cifar_batch(f)
    with pytest.raises(IgptError, match="not allowed"):
        cifar_source(tmp_path)


def test_hf_pytorch_model_bin(tmp_path, marker):
    from igpt_testutil import tiny_config

    from igpt.hf import load_hf, our_config_to_hf

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(our_config_to_hf(tiny_config())))
    torch.save({"transformer.wte.weight": torch.zeros(2), "evil": Boom(marker)}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(IgptError, match=r"pytorch_model.bin: refused or unreadable with torch.load\(weights_only=True\)"):
        load_hf(tmp_path / "hf")


def test_object_npy_as_data_palette_and_shards(tmp_path, marker, shards):
    from igpt.data import array_source
    from igpt.palette import Palette
    from igpt.shards import load_shards

    obj = np.array([Boom(marker)], dtype=object)
    np.save(tmp_path / "x.npy", obj, allow_pickle=True)
    np.savez(tmp_path / "x.npz", images=obj)
    for f in ("x.npy", "x.npz[images.npy]"):
        with pytest.raises(IgptError, match=re.escape(f"{f}: holds Python objects (pickled)")):
            array_source(tmp_path / f.split("[")[0])
    with pytest.raises(IgptError, match="x.npy: not a readable .npy palette"):
        Palette.load(tmp_path / "x.npy")
    sh = tmp_path / "sh"
    shutil.copytree(shards, sh)
    np.save(sh / "train_tokens.npy", obj, allow_pickle=True)
    with pytest.raises(IgptError, match="train_tokens.npy"):
        load_shards(sh)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_training_checkpoint_state_files(shards, tmp_path, marker, name):
    from igpt.train import train
    from igpt.train_config import TrainConfig
    from igpt.train_state import load_train_checkpoint

    cfg = TrainConfig(data=str(shards), preset="tiny", out=str(tmp_path / "run"), steps=1, batch_size=4, warmup=1,
                      dtype="fp32", eval_every=0, eval_images=8, progress=False)
    res = train(cfg)
    ckpt = res["checkpoint"]
    torch.save({"state": {"x": Boom(marker)}, "ranks": [Boom(marker)]}, ckpt / name)
    with pytest.raises(IgptError, match=f"{name}.*weights_only"):
        load_train_checkpoint(ckpt, res["model"].config)
    with pytest.raises(IgptError, match=name):
        train(TrainConfig(**{**cfg.to_dict(), "steps": 2, "resume": "auto"}))


# -- the source: no code execution on input, safe loaders only ------------------------------------------------
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else (
                f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None)
            yield name, {k.arg: k.value for k in node.keywords}, node


def test_source_has_no_eval_and_only_safe_loaders():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for name, kw, node in _calls(tree):
            where = f"{path.name}:{node.lineno}"
            const = lambda k: isinstance(kw.get(k), ast.Constant) and kw[k].value  # noqa: E731
            if name in ("eval", "exec", "compile", "__import__", "os.system", "os.popen"):
                bad.append(f"{where} {name}")
            elif name in ("pickle.load", "pickle.loads", "marshal.loads", "yaml.load", "shelve.open", "dill.load"):
                bad.append(f"{where} {name}")
            elif name == "torch.load" and const("weights_only") is not True:
                bad.append(f"{where} torch.load without weights_only=True")
            elif name == "np.load" and "allow_pickle" not in kw or name == "np.load" and const("allow_pickle") is not False:
                bad.append(f"{where} np.load without allow_pickle=False")
            elif name and name.startswith("subprocess.") and const("shell") is True:
                bad.append(f"{where} shell=True")
    assert not bad, bad
    # the one Unpickler subclass is the restricted CIFAR one, and it overrides find_class
    from igpt.cifar import _CifarUnpickler

    assert "find_class" in _CifarUnpickler.__dict__


def test_config_files_are_read_as_data_only(tmp_path):
    """Every config / meta file is parsed as data (json, and tomllib for the --config files), never imported
    or evaluated; YAML (whose loaders can build objects) is not read at all. A settings file that looks like code
    stays a string, and nothing runs."""
    from igpt.settings import read_settings_file

    files = {p.name: p.read_text() for p in SRC.rglob("*.py")}
    text = "".join(files.values())
    assert "import_module" not in text and "runpy" not in text and "literal_eval" not in text
    assert "yaml" not in text.lower()
    assert [n for n, t in files.items() if "tomllib" in t] == ["settings.py"]  # its one use: tomllib.loads
    assert files["settings.py"].count("tomllib.load") == 1 and "tomllib.loads(text)" in files["settings.py"]
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    (tmp_path / "c.toml").write_text(f"data = {json.dumps(code)}\n")
    (tmp_path / "c.json").write_text(json.dumps({"data": code}))
    for name in ("c.toml", "c.json"):
        assert read_settings_file(tmp_path / name, "train") == {"data": code}
    assert not marker.exists()


def test_ruff_security_rules_catch_unsafe_calls(tmp_path):
    ruff = shutil.which("ruff") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\n\n\ndef f(b):\n    return pickle.loads(b)\n\n\ndef g(s):\n    return eval(s)\n")
    r = subprocess.run([ruff, "check", "--no-cache", "--config", str(pyproject), str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "S301" in r.stdout and "S307" in r.stdout, r.stdout + r.stderr
    good = tmp_path / "good.py"
    good.write_text("import json\n\n\ndef f(s):\n    return json.loads(s)\n")
    r = subprocess.run([ruff, "check", "--no-cache", "--config", str(pyproject), str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_deeply_nested_files_are_one_line_errors(tmp_path):
    """JSON or TOML nested past Python's recursion limit: the parsers raise RecursionError, which was a
    traceback from --config and from every JSON file read with io.read_json (a checkpoint's config.json)."""
    from igpt.checkpoint import load_model
    from igpt.settings import read_settings_file

    depth = 100_000
    (tmp_path / "c.json").write_text('{"data": ' + "[" * depth + "]" * depth + "}")
    (tmp_path / "c.toml").write_text("data = " + "[" * depth + "]" * depth + "\n")
    for name, kind in (("c.json", "JSON"), ("c.toml", "TOML")):
        with pytest.raises(IgptError) as e:
            read_settings_file(tmp_path / name, "train")
        assert str(e.value).startswith(f"--config {tmp_path / name}: not a readable {kind} file (maximum recursion")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text((tmp_path / "c.json").read_text())
    with pytest.raises(IgptError) as e:
        load_model(ck)
    assert str(e.value).startswith(f"{ck / 'config.json'}: not readable JSON (maximum recursion depth exceeded")


def test_json_settings_beside_their_table(tmp_path, capsys):
    """In a JSON --config with a "config" table, a setting found only at the top was silently ignored; it is
    refused, as in TOML. A run's own record still loads: eval.json repeats settings at the top, train's
    config.json reports resolved values there (dtype 'float32' for 'auto'), and the table wins, also in a
    record from an older igpt whose table lacks a field added since."""
    from igpt.cli import main
    from igpt.evaluate import EvalConfig
    from igpt.settings import build, merged
    from igpt.train_config import TrainConfig

    f = tmp_path / "e.json"
    f.write_text(json.dumps({"config": {"checkpoint": "ck", "data": "sh", "split": "val"}, "split": "test",
                             "max_images": 10}))
    assert main(["eval", "--config", str(f)]) == 2
    assert capsys.readouterr().err.strip() == (f'igpt: error: --config {f}: settings both at the top (max_images) '
                                               'and in a "config" table; put them all in one place')
    f.write_text(json.dumps({"nats_per_token": 1.0, "split": "val", "checkpoint": "ck",
                             "config": {"checkpoint": "ck", "data": "sh", "split": "val"}}))
    assert build(EvalConfig, merged(str(f), "config", {"split": "test"}, "eval"), "eval").split == "test"
    record = TrainConfig(data="sh").to_dict()
    f.write_text(json.dumps({"train": record, "dtype": "float32", "device": "cpu", "micro_batch_size": 64}))
    assert build(TrainConfig, merged(str(f), "train", {}, "train"), "train").to_dict() == record
    older = {k: v for k, v in record.items() if k != "stop_at"}  # a field the older igpt did not have
    f.write_text(json.dumps({"train": older, "dtype": "float32", "device": "cpu", "micro_batch_size": 64}))
    assert build(TrainConfig, merged(str(f), "train", {}, "train"), "train").to_dict() == record


def test_config_files_with_hostile_values_are_one_line_errors(tmp_path, capsys):
    """A 5000-digit integer (Python's int-conversion limit raised a plain ValueError), a NUL or an unpaired
    surrogate in a string (ValueError / UnicodeEncodeError deep in training) and an infinite time limit (written
    back as `Infinity`, which is not JSON) gave tracebacks or invalid records; each is now one line, exit 2."""
    from igpt.cli import main

    cases = [("big.json", '{"data": "sh", "steps": 1' + "0" * 5000 + "}", "not a readable JSON file"),
             ("big.toml", 'data = "sh"\nsteps = 1' + "0" * 5000 + "\n", "not a readable TOML file"),
             ("nul.json", '{"data": "sh", "out": "x\\u0000y"}', "out holds a NUL character or an unpaired surrogate"),
             ("sur.json", '{"data": "sh", "out": "\\ud800"}', "out holds a NUL character or an unpaired surrogate"),
             ("inf.json", '{"data": "sh", "out": "o", "time_limit": 1e999}', "time_limit must be a finite number")]
    for name, text, message in cases:
        f = tmp_path / name
        f.write_text(text)
        assert main(["train", "--config", str(f)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("igpt: error: ") and message in err and err.count("\n") == 1, (name, err)
