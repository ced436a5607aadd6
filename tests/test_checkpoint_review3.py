"""Review 3 of checkpoints, atomic writes and settings files: each test failed before its fix."""

import json

import pytest
from igpt_testutil import tiny_model

from igpt.checkpoint import load_model, save_model
from igpt.errors import IgptError


def test_a_json_config_naming_a_setting_twice_is_refused_as_toml_is(tmp_path, capsys):
    """Python's json keeps the last of two equal names, so a --config file with `"lr": 0.1` near the top and
    `"lr": 0.001` further down trained with 0.001 and said nothing; the same file in TOML is refused ("Cannot
    overwrite a value"). Both are one-line errors now, in a table nested in the file too."""
    from igpt.cli import main
    from igpt.settings import read_settings_file

    f = tmp_path / "c.json"
    f.write_text('{"data": "sh", "lr": 0.1, "steps": 5, "lr": 0.001}')
    with pytest.raises(IgptError, match=r"^--config .*c\.json: not a readable JSON file \('lr' is given twice"):
        read_settings_file(f, "train")
    f.write_text('{"data": "sh", "model_overrides": {"n_layer": 2, "n_layer": 4}}')
    with pytest.raises(IgptError, match="'n_layer' is given twice"):
        read_settings_file(f, "train")
    f.write_text('{"train": {"data": "sh", "steps": 5}, "train": {"data": "sh", "steps": 50}}')  # a record
    assert main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"igpt: error: --config {f}: not a readable JSON file ('train' is given twice") and \
        err.count("\n") == 1
    t = tmp_path / "c.toml"
    t.write_text('data = "sh"\nlr = 0.1\nlr = 0.001\n')
    with pytest.raises(IgptError, match="not a readable TOML file"):
        read_settings_file(t, "train")
    f.write_text('{"data": "sh", "lr": 0.1, "betas": [0.9, 0.9]}')  # equal values in a list are fine
    assert read_settings_file(f, "train") == {"data": "sh", "lr": 0.1, "betas": [0.9, 0.9]}


def test_a_checkpoint_config_naming_a_field_twice_is_refused(tmp_path):
    """A checkpoint's config.json with two n_head (3, which the weights were trained with, then 6: n_embd 24
    divides by both, and no tensor's shape depends on it) loaded as a 6-head model without a word."""
    ck = save_model(tmp_path / "ck", tiny_model())
    text = (ck / "config.json").read_text()
    assert json.loads(text)["n_head"] == 3
    (ck / "config.json").write_text(text.replace('"n_head": 3,', '"n_head": 3, "n_head": 6,'))
    with pytest.raises(IgptError, match=r"config\.json: not readable JSON \('n_head' is given twice"):
        load_model(ck)


@pytest.mark.parametrize("command", [["demo", "--data", "no-such-folder"], ["train", "--data", "sh"],
                                     ["prepare", "--data", "no-such-folder", "--out", "o"],
                                     ["eval", "--checkpoint", "ck", "--data", "sh"]])
def test_an_empty_config_path_is_refused_not_read_as_none(tmp_path, monkeypatch, capsys, command):
    """`--config "$CFG"` with CFG unset passes an empty path, which read as no --config at all: the command ran on
    its defaults without a word (`igpt demo` started the 9-minute default demo, replacing runs/demo). It is a
    one-line error before anything is read or written (the missing data here only makes a regression fail fast)."""
    from igpt.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*command, "--config", ""]) == 2
    err = capsys.readouterr().err
    assert err == "igpt: error: --config is empty: give a .json or .toml file\n"
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_naming_a_pid_past_the_c_int_range_is_an_orphan_not_a_traceback(tmp_path):
    """remove_orphans asked os.kill about the pid in a temporary's name: one past the C int range raised
    OverflowError (a traceback out of every atomic write into that folder). No process has it: it is removed."""
    import socket

    from igpt.io import atomic_write_bytes

    junk = tmp_path / f".eval.json.{socket.gethostname()}-99999999999999999999.x1.tmp"
    junk.write_text("{")
    atomic_write_bytes(tmp_path / "eval.json", b"{}")
    assert not junk.exists() and (tmp_path / "eval.json").read_bytes() == b"{}"


def test_an_output_that_is_a_file_gets_no_stray_lock_beside_it(tmp_path):
    """train, probe, finetune and demo lock their output folder through '.NAME.lock' beside it, made before the
    output is checked: `--out some_file` (refused) left '.some_file.lock' behind."""
    from igpt.io import output_lock

    f = tmp_path / "afile"
    f.write_text("x")
    with output_lock(f):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    with output_lock(tmp_path / "run"):  # a folder to be: locked as before
        assert (tmp_path / ".run.lock").is_file()
