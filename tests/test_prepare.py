"""Token shards: contents equal the in-memory pipeline, deterministic splits, atomic and idempotent writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from igpt import prepare as prep
from igpt.datasets import open_source
from igpt.errors import IgptError
from igpt.images import to_square
from igpt.palette import Palette
from igpt.prepare import PrepareConfig, prepare, val_mask
from igpt.shards import load_shards


def make_folder(root, rng, classes=("a", "b", "c"), per=7, size=(20, 14)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def in_memory(data, n_px, palette, val_fraction=0.1, seed=0):
    """The same pipeline without streaming or files: decode all, resize, quantize, split."""
    src = open_source(str(data))
    out = {}
    for name, split in src.splits.items():
        imgs, labs, native = [], [], []
        for x, y in split.chunks(10**9):
            imgs += [to_square(im, n_px) for im in x]
            native += [to_square(im, min(im.shape[:2])) for im in x]
            labs += [] if y is None else list(y)
        out[name] = (palette.quantize(np.stack(imgs)).reshape(len(imgs), -1), np.array(labs), np.stack(imgs),
                     np.stack(native))
    tr = out.pop("train")
    m = val_mask(len(tr[0]), val_fraction, seed)
    out["train"], out["val"] = tuple(a[~m] for a in tr), tuple(a[m] for a in tr)
    return out


def test_val_mask_is_deterministic():
    a = val_mask(1000, 0.1, seed=5)
    assert a.sum() == 100 and np.array_equal(a, val_mask(1000, 0.1, seed=5))
    assert not np.array_equal(a, val_mask(1000, 0.1, seed=6))
    assert val_mask(7, 0.0, 0).sum() == 0


def test_shards_equal_in_memory_pipeline(tmp_path, rng):
    data = make_folder(tmp_path / "imgs", rng)
    cfg = PrepareConfig(out=str(tmp_path / "out"), data=str(data), n_px=8, palette_size=12, chunk_size=4)
    meta = prepare(cfg)
    sh = load_shards(tmp_path / "out")
    assert meta["counts"] == {"train": 19, "val": 2} and meta["class_names"] == ["a", "b", "c"]
    # the fit's device, resolved: `prepare --config meta.json` on a machine with a GPU fitted there (None)
    fitted_on = "cuda" if torch.cuda.is_available() else "cpu"
    assert meta["config"]["fit_device"] == meta["palette_fit"]["device"] == fitted_on and cfg.fit_device is None
    assert sh.palette.k == 12 and sh.palette.channels == 3 and meta["palette_sha256"] == sh.palette.hash
    ref = in_memory(data, 8, sh.palette)
    for split in ("train", "val"):
        t = sh.tokens(split)
        assert isinstance(t, np.memmap) and t.dtype == np.uint16 and t.shape[1] == 64
        assert np.array_equal(np.asarray(t), ref[split][0])
        assert np.array_equal(sh.labels(split), ref[split][1])
        px = sh.pixels(split)  # the images before quantization: the tokens are exactly their quantization
        assert px.dtype == np.uint8 and px.shape == (len(t), 8, 8, 3) and np.array_equal(px, ref[split][2])
        assert np.array_equal(sh.palette.quantize(np.asarray(px)).reshape(len(t), -1), np.asarray(t))
        nat = sh.pixels(split, native=True)  # 20x14 images: the centre 14x14, not resampled
        assert meta["native_px"] == 14 and nat.shape == (len(t), 14, 14, 3) and np.array_equal(nat, ref[split][3])


def test_no_pixels_and_damaged_pixel_files(tmp_path, rng):
    data = make_folder(tmp_path / "imgs", rng, per=3)
    prepare(PrepareConfig(out=str(tmp_path / "np"), data=str(data), n_px=6, palette_size=5, pixels=False))
    sh = load_shards(tmp_path / "np")
    assert not list((tmp_path / "np").glob("*_pixels.npy")) and sh.pixels("train") is None
    assert not list((tmp_path / "np").glob("*_native.npy")) and sh.pixels("train", native=True) is None
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(data / "b" / "big.png")
    for name, n_px in (("mixed", 6), ("small", 14)):  # mixed native sizes; native no larger than n_px
        meta = prepare(PrepareConfig(out=str(tmp_path / name), data=str(data), n_px=n_px, palette_size=5))
        assert meta["native_px"] is None and not list((tmp_path / name).glob("*_native.npy"))
        assert not list((tmp_path / name).glob(".native-*")) and load_shards(tmp_path / name).pixels("val") is not None
    prepare(PrepareConfig(out=str(tmp_path / "o"), data=str(data), n_px=6, palette_size=5))
    np.save(tmp_path / "o" / "val_pixels.npy", np.zeros((1, 5, 6, 3), np.uint8))
    with pytest.raises(IgptError, match="val_pixels.npy: uint8 \\(1, 5, 6, 3\\), meta.json says uint8 \\(1, 6, 6, 3\\)"):
        load_shards(tmp_path / "o").pixels("val")
    (tmp_path / "o" / "val_pixels.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(IgptError, match="val_pixels.npy: unreadable"):
        load_shards(tmp_path / "o").pixels("val")


def test_test_fraction_carves_a_disjoint_test_split(tmp_path, rng):
    """A source without a test split (class folders) gets one held out of train, disjoint from train and val;
    the three splits together are exactly the source's images."""
    data = make_folder(tmp_path / "imgs", rng, per=20)
    meta = prepare(PrepareConfig(out=str(tmp_path / "out"), data=str(data), n_px=8, palette_size=12,
                                 test_fraction=0.2, seed=4))
    assert meta["counts"] == {"train": 43, "val": 5, "test": 12}
    sh = load_shards(tmp_path / "out")
    ref = in_memory(data, 8, sh.palette, val_fraction=0.0)["train"][0]  # every image, in source order
    rows = {s: {bytes(r) for r in np.asarray(sh.tokens(s))} for s in ("train", "val", "test")}
    assert not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"]) and not (rows["train"] & rows["val"])
    assert rows["train"] | rows["val"] | rows["test"] == {bytes(r) for r in ref}
    assert all(sh.labels(s) is not None for s in ("train", "val", "test"))
    with pytest.raises(IgptError, match="test_fraction"):
        PrepareConfig(out="x", test_fraction=0.95)
    with pytest.raises(IgptError, match=r"--test-fraction 0.005 of 60 training images holds out none"):
        prepare(PrepareConfig(out=str(tmp_path / "out2"), data=str(data), n_px=8, palette_size=12,
                              test_fraction=0.005))  # an empty test split, with exit status 0
    assert not (tmp_path / "out2").exists()


def test_bundled_prepare_with_given_palette(tmp_path):
    pal = Palette(np.linspace(-1, 1, 8)[:, None].astype(np.float32))
    pal.save(tmp_path / "grey8.npy")
    meta = prepare(PrepareConfig(out=str(tmp_path / "o"), n_px=14, palette=str(tmp_path / "grey8.npy")))
    assert meta["counts"] == {"train": 7200, "val": 800, "test": 2000} and meta["palette_fit"] is None
    sh = load_shards(tmp_path / "o")
    assert np.array_equal(sh.palette.centers, pal.centers)
    src = open_source("fashion-mnist-mini")
    x, y = next(src.splits["test"].chunks(50))
    ref = pal.quantize(np.stack([to_square(im, 14) for im in x])).reshape(50, -1)
    assert np.array_equal(sh.tokens("test")[:50], ref) and np.array_equal(sh.labels("test")[:50], y)


def test_rerun_is_idempotent(tmp_path, rng):
    data = make_folder(tmp_path / "imgs", rng, per=3)
    cfg = PrepareConfig(out=str(tmp_path / "out"), data=str(data), n_px=6, palette_size=5)
    prepare(cfg)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    prepare(cfg)
    second = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out"]  # no temporary folders left


def test_interrupted_prepare_leaves_nothing_loadable(tmp_path, rng, monkeypatch):
    data = make_folder(tmp_path / "imgs", rng, per=3)
    cfg = PrepareConfig(out=str(tmp_path / "out"), data=str(data), n_px=6, palette_size=5, chunk_size=2)
    calls = {"n": 0}
    real = Palette.quantize

    def dying(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C half way through pass 2
        return real(self, x)

    monkeypatch.setattr(Palette, "quantize", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]
    monkeypatch.setattr(Palette, "quantize", real)
    prepare(cfg)
    before = (tmp_path / "out" / "meta.json").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(Palette, "quantize", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert (tmp_path / "out" / "meta.json").read_bytes() == before  # the previous complete output survives
    load_shards(tmp_path / "out")


def test_skip_bad_counts_files(tmp_path, rng):
    data = make_folder(tmp_path / "imgs", rng, per=4)
    (data / "b" / "2.png").write_bytes(b"")
    with pytest.raises(IgptError, match="2.png: an empty file"):
        prepare(PrepareConfig(out=str(tmp_path / "o"), data=str(data), n_px=6, palette_size=5))
    assert not (tmp_path / "o").exists()
    meta = prepare(PrepareConfig(out=str(tmp_path / "o"), data=str(data), n_px=6, palette_size=5, skip_bad=True))
    assert meta["skipped"] == [str(data / "b" / "2.png")] and sum(meta["counts"].values()) == 11


def test_a_decompression_bomb_header_is_a_bad_file(tmp_path, rng):
    """A PNG whose header claims 30000 x 30000 pixels: Pillow refuses it on open; the channel probe that reads
    every header first must treat it as a bad file too (named, or skipped with --skip-bad), not crash."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    data = make_folder(tmp_path / "imgs", rng, per=3)
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    (data / "a" / "0-bomb.png").write_bytes(bomb)
    with pytest.raises(IgptError, match="0-bomb.png"):
        prepare(PrepareConfig(out=str(tmp_path / "o"), data=str(data), n_px=6, palette_size=5))
    meta = prepare(PrepareConfig(out=str(tmp_path / "o"), data=str(data), n_px=6, palette_size=5, skip_bad=True))
    assert meta["skipped"] == [str(data / "a" / "0-bomb.png")]


def test_palette_channel_mismatch_refused_before_decoding(tmp_path, rng):
    Palette(rng.uniform(-1, 1, (16, 3))).save(tmp_path / "rgb.npy")
    with pytest.raises(IgptError, match="palette is RGB.*grey"):
        prepare(PrepareConfig(out=str(tmp_path / "o"), palette=str(tmp_path / "rgb.npy"), n_px=8))


def test_an_unusable_fit_device_is_refused_before_decoding(tmp_path, rng, monkeypatch):
    """A config's fit_device 'cuda' on a machine without one was an AssertionError traceback after decoding."""
    import igpt.prepare as P

    data = make_folder(tmp_path / "imgs", rng)
    monkeypatch.setattr(P, "_decode_split", lambda *a, **k: pytest.fail("decoded before checking the device"))
    with pytest.raises(IgptError, match="prepare config fit_device 'nope' is not a torch device"):
        prepare(PrepareConfig(out=str(tmp_path / "out"), data=str(data), n_px=8, palette_size=4, fit_device="nope"))
    if not torch.cuda.is_available():
        with pytest.raises(IgptError, match="prepare config fit_device cuda: not usable on this machine"):
            prepare(PrepareConfig(out=str(tmp_path / "out"), data=str(data), n_px=8, palette_size=4,
                                  fit_device="cuda"))


def test_config_contradictions():
    with pytest.raises(IgptError, match="palette-size only applies"):
        PrepareConfig(out="x", palette="p.npy", palette_size=16)
    with pytest.raises(IgptError, match="val_fraction"):
        PrepareConfig(out="x", val_fraction=1.5)
    with pytest.raises(IgptError, match="n_px"):
        PrepareConfig(out="x", n_px=0)


def test_load_shards_checks(tmp_path, rng):
    data = make_folder(tmp_path / "imgs", rng, per=3)
    prepare(PrepareConfig(out=str(tmp_path / "o"), data=str(data), n_px=6, palette_size=5))
    with pytest.raises(IgptError, match="no meta.json"):
        load_shards(tmp_path / "imgs")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    meta["counts"]["train"] += 1
    (tmp_path / "o" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IgptError, match="train_tokens.npy.*meta.json says"):
        load_shards(tmp_path / "o")
    meta["counts"]["train"] -= 1
    meta["palette_sha256"] = "0" * 64
    (tmp_path / "o" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IgptError, match="palette.npy does not match"):
        load_shards(tmp_path / "o")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())  # restore, then damage the labels
    meta["palette_sha256"] = Palette.load(tmp_path / "o" / "palette.npy").hash
    meta["version"] = 2  # a later igpt's layout: refused by name (the version was never compared)
    (tmp_path / "o" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IgptError, match="shard format version 2; this igpt reads version 1"):
        load_shards(tmp_path / "o")
    meta["version"] = 1
    (tmp_path / "o" / "meta.json").write_text(json.dumps(meta))
    labels = tmp_path / "o" / "train_labels.npy"
    good = labels.read_bytes()
    load_shards(tmp_path / "o")
    for bad, message in [(good[:-3], "train_labels.npy: unreadable"),
                         (None, r"train_labels.npy: int64 \(2,\), expected integer labels")]:
        if bad is None:
            np.save(labels, np.zeros(2, dtype=np.int64))  # too few for the split
        else:
            labels.write_bytes(bad)  # truncated
        with pytest.raises(IgptError, match=message):
            load_shards(tmp_path / "o")


def test_the_working_folder_is_refused_as_output_before_any_work(tmp_path, rng, monkeypatch):
    """`--out .` in an empty folder did all the work, then failed to rename onto '.' (EBUSY); refused at once."""
    import igpt.prepare as P

    data = make_folder(tmp_path / "imgs", rng, per=2)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setattr(P, "_decode_split", lambda *a: pytest.fail("work began"))
    with pytest.raises(IgptError, match="the folder you are working in .* cannot be replaced"):
        prepare(PrepareConfig(out=".", data=str(data), n_px=6, palette_size=5))


def test_no_training_images_left_is_a_clear_error(tmp_path, rng):
    data = make_folder(tmp_path / "imgs", rng, classes=("a",), per=2)
    with pytest.raises(IgptError, match="no training images left after holding out val"):
        prepare(PrepareConfig(out=str(tmp_path / "o"), data=str(data), n_px=6, palette_size=2, val_fraction=0.9))
    assert not (tmp_path / "o").exists()


def test_sample_pixels_from_chosen_rows(tmp_path):
    pix = prep.PixelFile(tmp_path / "p.u8", 2, 1)
    pix.append(np.arange(40, dtype=np.uint8).reshape(10, 2, 2, 1))
    got = prep.sample_pixels(pix, np.array([1, 3]), 100, seed=0, chunk=3)  # fewer pixels than asked: all of them
    assert sorted(got[:, 0].tolist()) == [4, 5, 6, 7, 12, 13, 14, 15]
    got = prep.sample_pixels(pix, np.arange(10), 5, seed=0, chunk=3)
    assert len(got) == 5 and len(np.unique(got)) == 5


@pytest.mark.shared_data
def test_full_fashion_mnist(tmp_path, shared_data):
    meta = prepare(PrepareConfig(out=str(tmp_path / "o"), data="fashion-mnist", data_dir=str(shared_data), n_px=16))
    assert meta["counts"] == {"train": 54000, "val": 6000, "test": 10000}
    sh = load_shards(tmp_path / "o")
    assert sh.tokens("train").max() < 16 and len(np.unique(sh.labels("test"))) == 10


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("years of work")
    with pytest.raises(IgptError, match="docs is a non-empty directory that igpt did not write"):
        prepare(PrepareConfig(out=str(tmp_path / "docs"), n_px=8))
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "years of work"
