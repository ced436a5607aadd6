"""What feeds training: shards whose meta.json contradicts its files, and checkpoints that fingerprinted shards
swapped in under a running run (found by a review in the seventeenth session)."""

from __future__ import annotations

import json
import shutil

import pytest

from igpt.errors import IgptError
from igpt.shards import load_shards
from igpt.train import train
from igpt.train_config import TrainConfig


def _edited(shards, tmp_path, **edits):
    """A copy of the session's shards (8x8, 8 grey colours) with meta.json's keys replaced (None: removed)."""
    out = tmp_path / "edited"
    shutil.copytree(shards, out)
    meta = json.loads((out / "meta.json").read_text())
    for k, v in edits.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def _tiny(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), preset="tiny", out=str(out), steps=2, batch_size=4, warmup=1, dtype="fp32",
                eval_images=8, progress=False)
    return TrainConfig(**{**base, **kw})


def test_a_palette_size_that_contradicts_palette_npy_is_refused(shards, tmp_path):
    """meta.json's palette_size sizes the model: 16 beside an 8-colour palette.npy trained a run (exit 0) whose
    checkpoints `igpt sample` then refused ("8 colours, but the model has 16"); 4 blamed the tokens file."""
    for size in (16, 4):
        bad = _edited(shards, tmp_path / str(size), palette_size=size)
        with pytest.raises(IgptError, match=f"meta.json says a palette of {size} colours, palette.npy has 8"):
            load_shards(bad)
        with pytest.raises(IgptError, match="palette.npy has 8"):
            train(_tiny(bad, tmp_path / str(size) / "run"))
        assert not (tmp_path / str(size) / "run" / "checkpoints").exists()


def test_a_meta_json_without_palette_size_is_one_line(shards, tmp_path):
    """It was a KeyError traceback out of igpt train (resolve_model_config)."""
    bad = _edited(shards, tmp_path, palette_size=None)
    with pytest.raises(IgptError, match=r"meta.json: malformed \('palette_size'\)"):
        load_shards(bad)
    with pytest.raises(IgptError, match="malformed"):
        train(_tiny(bad, tmp_path / "run"))


@pytest.mark.parametrize("n_px", ["8", 8.0])
def test_n_px_in_meta_json_must_be_an_integer(shards, tmp_path, n_px):
    """int() let "8" and 8.0 through while Shards.n_px returned meta.json's own value: `igpt train --augment`
    was a TypeError traceback (n_px // 8, np.arange(8.0) in the loader)."""
    bad = _edited(shards, tmp_path, n_px=n_px)
    with pytest.raises(IgptError, match=f"meta.json: malformed \\(n_px is {n_px!r}, not an integer >= 1\\)"):
        load_shards(bad)
    with pytest.raises(IgptError, match="not an integer"):
        train(_tiny(bad, tmp_path / "run", augment=True))


def test_checkpoints_record_the_shards_the_run_read_not_what_replaced_them(shards, tmp_path, monkeypatch):
    """The run reads the token files it opened at its start (memory maps: a replaced file's old inode stays), but
    every checkpoint fingerprinted the files found at the path when it was saved: after `igpt prepare` (another
    seed, the same palette) replaced the shards mid-run, the later checkpoints named the new data, and a
    --resume auto continued on them, the change the fingerprint exists to refuse."""
    import igpt.train as T
    from igpt.prepare import PrepareConfig, prepare

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    save = T._save

    def save_then_replace(*a, **kw):  # after the first checkpoint: new shards, same palette and sizes
        path = save(*a, **kw)
        if path.name == "step-000002":  # prepare swaps the whole folder in: the run's memory maps keep the old
            prepare(PrepareConfig(out=str(data), data="fashion-mnist-mini", n_px=8, seed=1,
                                  palette=str(shards / "palette.npy")))
        return path

    monkeypatch.setattr(T, "_save", save_then_replace)
    train(_tiny(data, tmp_path / "run", steps=4, save_every=2))
    ck = tmp_path / "run" / "checkpoints"
    fp = [json.loads((ck / f"step-00000{s}" / "train_state.json").read_text())["shards"]["tokens_sample_sha256"]
          for s in (2, 4)]
    assert fp[0] == fp[1]  # the same data was read throughout
    monkeypatch.setattr(T, "_save", save)
    with pytest.raises(IgptError, match="cannot resume on other shards"):
        train(_tiny(data, tmp_path / "run", steps=4, save_every=2, resume="auto"))
