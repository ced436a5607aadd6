"""Model checkpoint directories: round trip, atomic replacement, clear errors for bad files."""

import json
import os

import numpy as np
import pytest
import torch
from igpt_testutil import grey_palette, rgb_palette, tiny_model
from safetensors.torch import save_file

from igpt.checkpoint import load_heads, load_model, read_config, save_model
from igpt.errors import IgptError
from igpt.palette import Palette


def test_round_trip_with_palette_and_heads(tmp_path):
    m = tiny_model(seed=3)
    score = torch.randn(5, 24)
    save_model(tmp_path / "ck", m, palette=rgb_palette(16), heads={"score": score})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json", "heads.safetensors", "model.safetensors", "palette.json", "palette.npy"]
    m2, pal = load_model(tmp_path / "ck")
    assert m2.config == m.config and not m2.training
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert isinstance(pal, Palette) and np.array_equal(pal.centers, rgb_palette(16))
    assert torch.equal(load_heads(tmp_path / "ck")["score"], score)
    x = torch.randint(0, 17, (2, 64))
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert all(p.requires_grad for p in m2.parameters())  # usable for fine-tuning


def test_without_palette_and_grey_palette(tmp_path):
    m = tiny_model()
    save_model(tmp_path / "a", m)
    assert load_model(tmp_path / "a")[1] is None and load_heads(tmp_path / "a") == {}
    save_model(tmp_path / "b", m, palette=Palette(grey_palette(16)))
    assert load_model(tmp_path / "b")[1].channels == 1
    with pytest.raises(IgptError, match="palette_size 16"):
        save_model(tmp_path / "c", m, palette=grey_palette(8))


def test_replaces_an_old_checkpoint_atomically(tmp_path):
    save_model(tmp_path / "ck", tiny_model(seed=1), palette=rgb_palette(16))
    m2 = tiny_model(seed=2)
    save_model(tmp_path / "ck", m2)  # no palette this time: the old palette.npy must not linger
    loaded, pal = load_model(tmp_path / "ck")
    assert pal is None and torch.equal(loaded.wte.weight, m2.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or old dirs left behind


@pytest.mark.parametrize("swap", [True, False])
def test_a_directory_is_replaced_in_one_swap_where_the_system_can(tmp_path, monkeypatch, swap):
    """atomic_dir swaps the new directory in with one renameat2(RENAME_EXCHANGE) on Linux (there is no moment
    without the directory, as two renames have); without it (``swap`` False), the two renames still end right."""
    import sys

    import igpt.io as io

    if swap and not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    calls = []
    real = io.exchange
    monkeypatch.setattr(io, "exchange", lambda a, b: calls.append(1) or (real(a, b) if swap else False))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "x").write_text("b")
    if swap:
        assert real(tmp_path / "a", tmp_path / "b")  # two existing directories trade places
        assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"
    for text in ("one", "two"):
        with io.atomic_dir(tmp_path / "d") as t:
            (t / "f").write_text(text)
    assert (tmp_path / "d" / "f").read_text() == "two" and len(calls) == 1  # the second write replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "d"]  # no temporary or old copy left


def test_temporary_folders_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A writer killed by SIGKILL (or a power loss) runs no ``finally``: its '.NAME.<host>-<pid>.*.tmp' stayed
    for good (gigabytes for a large prepare). The next atomic_dir of the same NAME removes those of dead
    processes on this host; a live process's, another host's and other names' are kept."""
    import socket
    import subprocess
    import sys

    import igpt.io as io

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    names = {"orphan": f".shards.{host}-{dead}.k2j3_x9a.tmp", "live": f".shards.{host}-{os.getppid()}.a1b2c3d4.tmp",
             "other_host": f".shards.elsewhere-{dead}.a1b2c3d4.tmp", "other_name": f".shards2.{host}-{dead}.ab12cd34.tmp"}
    for n in names.values():
        (tmp_path / n).mkdir()
        (tmp_path / n / "big.u8").write_bytes(b"x" * 100)
    with io.atomic_dir(tmp_path / "shards") as t:
        (t / "meta.json").write_text("{}")
    left = {p.name for p in tmp_path.iterdir()}
    assert names["orphan"] not in left and left == {"shards", *(n for k, n in names.items() if k != "orphan")}
    # single files too (eval.json, probe.json, a sample PNG: nothing removed those), with the same rules
    files = {"orphan": f".eval.json.{host}-{dead}.x1y2z3.tmp", "live": f".eval.json.{host}-{os.getppid()}.q1.tmp",
             "other_host": f".eval.json.elsewhere-{dead}.q2.tmp"}
    for n in files.values():
        (tmp_path / n).write_text("{")
    io.atomic_write_bytes(tmp_path / "eval.json", b"{}")
    left = {p.name for p in tmp_path.iterdir()} - {"shards", *names.values()}
    assert left == {"eval.json", files["live"], files["other_host"]}


def test_an_output_given_as_a_symlink_replaces_the_folder_it_names(tmp_path):
    """--out LINK -> REAL: REAL gets the new files and LINK stays a link (the link became a folder, REAL kept the
    old checkpoint, and a temporary symlink was left beside them)."""
    save_model(tmp_path / "real", tiny_model())
    (tmp_path / "link").symlink_to("real")
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.fill_(0.5)
    save_model(tmp_path / "link", model)
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert torch.equal(load_model(tmp_path / "real")[0].lm_head.weight, model.lm_head.weight)


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("x")
    with pytest.raises(IgptError, match="igpt did not write; refusing"):
        save_model(tmp_path / "data", tiny_model())
    (tmp_path / "file").write_text("x")
    with pytest.raises(IgptError, match="not a directory"):
        save_model(tmp_path / "file", tiny_model())
    assert (tmp_path / "data" / "precious.txt").read_text() == "x"
    (tmp_path / "empty").mkdir()
    save_model(tmp_path / "empty", tiny_model())


@pytest.mark.parametrize("config", ['{"model_type": "imagegpt", "n_embd": 512}', '{"name": "thesis"}', "not json"])
def test_a_config_json_of_someone_else_does_not_make_a_folder_ours(tmp_path, config):
    """A folder is replaced only when its config.json is an igpt model's: a Hugging Face model folder or any
    project with a config.json of its own is refused, and nothing in it is touched (it was deleted before)."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "config.json").write_text(config)
    (tmp_path / "proj" / "thesis.tex").write_text("years of work")
    with pytest.raises(IgptError, match="igpt did not write; refusing"):
        save_model(tmp_path / "proj", tiny_model())
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == ["config.json", "thesis.tex"]
    save_model(tmp_path / "ck", tiny_model())  # a checkpoint of ours is replaced as before
    save_model(tmp_path / "ck", tiny_model(seed=1))


def test_errors_name_the_bad_file(tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(IgptError, match="checkpoint not found"):
        load_model(ck)
    save_model(ck, tiny_model())
    (ck / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(IgptError, match="model.safetensors: corrupt"):
        load_model(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(IgptError, match="model.safetensors: missing"):
        load_model(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(IgptError, match="config.json: not readable JSON"):
        load_model(ck)
    (ck / "config.json").write_text(json.dumps({"n_px": 8, "n_embd": 30, "n_head": 4}))
    with pytest.raises(IgptError, match="config.json: model config: n_embd"):
        read_config(ck)
    (ck / "config.json").unlink()
    with pytest.raises(IgptError, match="config.json: missing"):
        load_model(ck)


def test_missing_unknown_and_misshapen_tensors(tmp_path):
    m = tiny_model()
    save_model(tmp_path / "ck", m)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    del state["h.1.ln_2.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(IgptError, match=r"missing \['h.1.ln_2.weight'\], unknown \['extra.weight'\]"):
        load_model(tmp_path / "ck")
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    state["wpe.weight"] = torch.zeros(10, 24)
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(IgptError, match="wpe.weight"):
        load_model(tmp_path / "ck")


@pytest.mark.parametrize("change", [{"n_layer": 100_000}, {"n_embd": 2**62, "n_head": 2}, {"n_px": 10**10}])
def test_a_config_far_larger_than_its_weights_fails_before_building(tmp_path, change):
    """The model was built (on the meta device) before the tensors were compared: 100,000 layers took minutes,
    a width of 2^62 ended in torch's 'Storage size calculation overflowed' with a C++ trace."""
    ck = save_model(tmp_path / "ck", tiny_model())
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(IgptError, match=r"model.safetensors: the config \(.*\) needs at least [\d,]+ numbers; the "
                                        r"file holds [\d,]+$"):
        load_model(ck)


def test_a_hugging_face_directory_gets_a_hint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "imagegpt", "n_embd": 24}))
    with pytest.raises(IgptError, match="import-hf"):
        load_model(tmp_path)


def test_a_training_run_directory_points_to_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    save_model(run / "checkpoints" / "step-000020", tiny_model())
    (run / "config.json").write_text(json.dumps({"train": {"steps": 20}, "model": {"n_px": 8}}))
    with pytest.raises(IgptError, match=r"is a training run, not a checkpoint.*the newest: step-000020"):
        load_model(run)


def test_files_get_the_umask_permissions(tmp_path):
    """safetensors creates its files 0600; a checkpoint's files follow the umask like every other output."""
    import os
    import stat
    from pathlib import Path

    old = os.umask(0o022)
    try:
        out = save_model(tmp_path / "ck", tiny_model(), heads={"score.weight": torch.zeros(3, 24)})
    finally:
        os.umask(old)
    for f in ("model.safetensors", "heads.safetensors", "config.json"):
        assert stat.S_IMODE((Path(out) / f).stat().st_mode) == 0o644, f
