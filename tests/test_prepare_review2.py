"""Review of the data preparation path and the command line (sixteenth session): each test fails on the code
before its fix, for the reason in its docstring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from igpt import prepare as prep
from igpt.cli import main
from igpt.errors import IgptError
from igpt.palette import Palette
from igpt.prepare import PrepareConfig, prepare


def grey_npz(path, rng, n=40, side=10, **extra):
    np.savez(path, images=rng.integers(0, 256, (n, side, side), dtype=np.uint8), labels=rng.integers(0, 3, n),
             **extra)
    return path


def grey_palette(path, k=6):
    Palette(np.linspace(-1, 1, k, dtype=np.float32)[:, None]).save(path)
    return path


@pytest.fixture
def shards(tmp_path, rng):
    out = tmp_path / "shards"
    prepare(PrepareConfig(out=str(out), data=str(grey_npz(tmp_path / "g.npz", rng)), n_px=8, palette_size=4))
    return out


# -- 1. train: a model or batch no machine can hold hung or crashed while being built ---------------------
@pytest.mark.parametrize("flags", [
    ["--n-layer", str(10**12)],  # built Block after Block, memory growing, until the process was killed
    ["--n-embd", str(2**40), "--n-head", "1"],  # RuntimeError: DefaultCPUAllocator: can't allocate memory
    ["--batch-size", str(10**30)],  # ValueError: Maximum allowed size exceeded (np.arange in the loader)
])
def test_train_refuses_a_model_or_batch_beyond_memory_before_building(shards, tmp_path, capsys, monkeypatch, flags):
    import igpt.train

    def built(*a, **k):
        raise AssertionError("the model was built: the settings were not refused first")

    monkeypatch.setattr(igpt.train, "ImageGPT", built)
    rc = main(["train", "--data", str(shards), "--preset", "tiny", "--steps", "2", "--warmup", "1",
               "--batch-size", "4", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "memory" in err, err


# -- 2. prepare: a palette size no data can give was refused only after decoding and the whole fit ---------
def test_palette_size_beyond_the_palette_limit_is_refused_by_the_config(tmp_path):
    """65535 colours passed PrepareConfig; on RGB data with enough colours k-means++ then ran 65535 sequential
    passes and Lloyd 100 iterations over (U, 65535) distances (hours), and only then did Palette refuse it."""
    with pytest.raises(IgptError, match="palette_size"):
        PrepareConfig(out=str(tmp_path / "o"), palette_size=65535)


@pytest.mark.parametrize("kw, msg", [
    (dict(palette_size=300), "256"),  # grey data: at most 256 levels, known before decoding
    (dict(palette_size=16, fit_pixels=10), "fit.pixels"),  # fewer sampled pixels than colours
])
def test_impossible_fit_is_refused_before_decoding(tmp_path, rng, monkeypatch, kw, msg):
    """Both failed after decoding every image; the second said 'the data has only 10 distinct colours ... use
    --palette-size 10 or less', blaming data with 200+ colours for the --fit-pixels setting."""
    def decoded(*a, **k):
        raise AssertionError("decoding started")

    monkeypatch.setattr(prep, "_decode_split", decoded)
    cfg = PrepareConfig(out=str(tmp_path / "o"), data=str(grey_npz(tmp_path / "g.npz", rng)), n_px=8, **kw)
    with pytest.raises(IgptError, match=msg):
        prepare(cfg)


# -- 3. openai-npy: settings the image path refuses were accepted ----------------------------------------
def openai_dir(tmp_path, rng, n):
    d = tmp_path / "dl"
    d.mkdir()
    np.save(d / "trX.npy", rng.integers(0, 6, (n, 64)).astype(np.int64))
    return d


@pytest.mark.parametrize("n, extra, match", [
    # --channels 3 with a grey palette wrote grey shards (meta.json: channels 1) whose recorded config says 3
    (20, {"channels": 3}, "channel"),
    # one image and --val-fraction 0.9: exit 0 and shards with 'train 0', which every other source refuses
    # (and `igpt train` then refuses)
    (1, {"val_fraction": 0.9}, "no training images"),
])
def test_openai_npy_refuses_settings_that_contradict_its_data(tmp_path, rng, n, extra, match):
    cfg = PrepareConfig(out=str(tmp_path / "s"), data=f"openai-npy:{openai_dir(tmp_path, rng, n)}",
                        palette=str(grey_palette(tmp_path / "p.npy")), **extra)
    with pytest.raises(IgptError, match=match):
        prepare(cfg)
    assert not (tmp_path / "s").exists()


# -- 4. .npz class names stored as bytes ------------------------------------------------------------------
def test_npz_bytes_class_names_are_decoded(tmp_path, rng):
    """np.array([b'cat', b'dog']) (h5py's and Python 2's strings) became "b'cat'", "b'dog'" in meta.json and
    every report; CIFAR's bytes names are decoded."""
    data = grey_npz(tmp_path / "g.npz", rng, class_names=np.array([b"cat", b"dog", b"emu"]))
    meta = prepare(PrepareConfig(out=str(tmp_path / "s"), data=str(data), n_px=8, palette_size=4))
    assert meta["class_names"] == ["cat", "dog", "emu"]
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["class_names"] == ["cat", "dog", "emu"]


# -- 5. an IDX image file whose name holds glob characters lost its labels (or took another file's) ----------
def test_idx_labels_found_for_a_name_with_glob_characters(tmp_path, rng):
    """'set[1]-images-idx3-ubyte' looked for its labels with the glob pattern 'set[1]-labels-idx1-ubyte', which
    matches 'set1-labels-idx1-ubyte' and not the file itself: the shards came out unlabelled without a word, or
    labelled from the other file when one of that name and count was there."""
    from conftest import write_idx

    from igpt.datasets import open_source

    x = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 12).astype(np.uint8)
    write_idx(tmp_path / "set[1]-images-idx3-ubyte", x)
    write_idx(tmp_path / "set[1]-labels-idx1-ubyte", y)
    write_idx(tmp_path / "set1-labels-idx1-ubyte", (y + 1) % 3)  # a decoy the unescaped pattern matches
    src = open_source(str(tmp_path / "set[1]-images-idx3-ubyte"))
    got = np.concatenate([lab for _, lab in src.splits["train"].chunks(5)])
    assert np.array_equal(got, y)
