"""Every file reader, fed mutated real files (bit flips, truncation, deletion, duplication, bytes spliced in from
the other formats), either reads the file or raises IgptError naming it: no other exception, no hang (a
deadline per case), and no allocation driven by a header's claims (10^12 pixels refused before allocating).
bench/fuzz.py runs the same targets for longer and prints the figures."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igpt.errors import IgptError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fuzz  # noqa: E402 - bench/fuzz.py: the targets and the mutator

NAMES = ["png_rgb", "png_grey", "jpeg", "idx", "idx_gz", "idx_labels", "cifar", "npy", "npz", "meta_json",
         "palette_npy", "palette_json", "safetensors", "checkpoint_config", "train_optimizer", "train_rng",
         "train_state"]
MUTATION = st.tuples(st.sampled_from(fuzz.OPS), st.integers(0, 1 << 20), st.integers(0, 1 << 16), st.integers(0, 1 << 16))


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    ts = {t.name: t for t in fuzz.build_targets(tmp_path_factory.mktemp("fuzz"))}
    assert sorted(ts) == sorted(NAMES)
    return ts


@pytest.mark.parametrize("name", NAMES)
def test_seed_files_read(targets, name):
    assert fuzz.classify(targets[name], targets[name].seed) == ("ok", "")


@pytest.mark.parametrize("name", NAMES)
def test_mutated_files_read_or_fail_clearly(targets, name):
    t = targets[name]
    pool = [x.seed for x in targets.values()]
    outcomes = {"ok": 0, "igpt_error": 0}

    @settings(max_examples=150, deadline=5000, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(MUTATION, min_size=1, max_size=4))
    def case(ops):
        kind, detail = fuzz.classify(t, fuzz.mutate(t.seed, ops, pool))
        assert kind in outcomes, detail
        if kind == "igpt_error":
            assert str(t.file.name) in detail or str(t.file.parent.name) in detail, detail  # names the file
        outcomes[kind] += 1

    case()
    assert outcomes["igpt_error"] > 0


# -- headers that lie about sizes: refused before any allocation ---------------------------------------------
def peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        with pytest.raises(IgptError) as e:
            fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    peak_mib.last = str(e.value)
    return peak


def npy_header(shape, dtype="|u1") -> bytes:
    h = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h


def png_header(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("claim", [10**12, 10**10])
def test_idx_header_claiming_huge_images(tmp_path, claim):
    from igpt.data import idx_split, read_idx

    n = claim // (1000 * 1000)
    for name, data in (("x.idx", b""), ("x.idx.gz", None)):
        head = bytes([0, 0, 8, 3]) + b"".join(struct.pack(">I", d) for d in (n, 1000, 1000)) + b"\x00" * 5000
        f = tmp_path / name
        f.write_bytes(gzip.compress(head) if data is None else head)
        assert peak_mib(lambda f=f: read_idx(f)) < 16, peak_mib.last
        assert name in peak_mib.last
        if claim == 10**12:
            assert peak_mib(lambda f=f: idx_split(f, None)) < 16 and "too large to be real" in peak_mib.last


def test_npy_and_npz_headers_claiming_huge_arrays(tmp_path):
    from igpt.data import array_source
    from igpt.palette import Palette

    (tmp_path / "x.npy").write_bytes(npy_header((10**6, 1000, 1000)) + b"\x00" * 4096)
    assert peak_mib(lambda: array_source(tmp_path / "x.npy")) < 16
    assert "x.npy: header declares a uint8 array of shape (1000000, 1000, 1000)" in peak_mib.last
    import zipfile

    with zipfile.ZipFile(tmp_path / "x.npz", "w") as z:
        z.writestr("images.npy", npy_header((10**6, 1000, 1000)) + b"\x00" * 4096)
    assert peak_mib(lambda: array_source(tmp_path / "x.npz")) < 16
    assert "x.npz[images.npy]: header declares" in peak_mib.last
    (tmp_path / "p.npy").write_bytes(npy_header((10**11, 3), "<f4") + b"\x00" * 64)
    assert peak_mib(lambda: Palette.load(tmp_path / "p.npy")) < 16 and "p.npy" in peak_mib.last


def test_image_header_claiming_huge_pixels(tmp_path):
    from igpt.data import folder_source
    from igpt.images import decode_image

    f = tmp_path / "bomb.png"
    f.write_bytes(png_header(1_000_000, 1_000_000))
    assert peak_mib(lambda: decode_image(f)) < 16
    assert "bomb.png" in peak_mib.last and "decompression bomb" in peak_mib.last.lower()
    src = folder_source(tmp_path, channels=3)
    assert peak_mib(lambda: list(src.splits["train"].chunks(4))) < 16


# -- mismatches: refused, naming both sides -------------------------------------------------------------------
def test_palette_that_does_not_match_the_shards(shards, tmp_path):
    from igpt.palette import Palette
    from igpt.shards import load_shards

    sh = tmp_path / "sh"
    shutil.copytree(shards, sh)
    Palette(np.linspace(-1, 1, 8, dtype=np.float32)[::-1, None].copy()).save(sh / "palette.npy")
    with pytest.raises(IgptError, match="palette.npy does not match the palette the shards were made with"):
        load_shards(sh)
    meta = json.loads((shards / "meta.json").read_text())
    Palette(np.linspace(-1, 1, 8 * 3, dtype=np.float32).reshape(8, 3)).save(sh / "palette.npy")
    meta["palette_sha256"] = Palette.load(sh / "palette.npy").hash
    (sh / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IgptError, match="meta.json says 1 channels, palette.npy has 3"):
        load_shards(sh)


def test_grey_palette_with_colour_data(rng):
    from igpt.palette import Palette

    grey = Palette(np.linspace(-1, 1, 4, dtype=np.float32)[:, None])
    with pytest.raises(IgptError) as e:
        grey.check_channels(3, "the data")
    assert "1" in str(e.value) and "3" in str(e.value) or "grey" in str(e.value).lower()
    with pytest.raises(IgptError):
        grey.quantize(rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8))


def test_shards_against_the_model_context_and_palette(shards, tmp_path):
    from igpt.train import train
    from igpt.train_config import TrainConfig

    base = dict(data=str(shards), preset="tiny", out=str(tmp_path / "run"), steps=1, warmup=1, batch_size=4, dtype="fp32",
                progress=False)
    with pytest.raises(IgptError, match=r"context of 64 tokens \(8x8\) but the model's position table has 16 \(n_px 4\)"):
        train(TrainConfig(**base, model_overrides={"n_px": 4}))
    with pytest.raises(IgptError, match=r"model palette_size 16 contradicts the shards \(.*meta.json: palette_size 8\)"):
        train(TrainConfig(**base, model_overrides={"palette_size": 16}))


def test_checkpoint_against_its_config(tmp_path):
    from igpt_testutil import tiny_model

    from igpt.checkpoint import load_model, save_model

    save_model(tmp_path / "ck", tiny_model())
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "n_embd": 48, "n_head": 4}))
    with pytest.raises(IgptError, match=r"model.safetensors: wrong tensor shapes: .*\(16, 24\) != \(16, 48\)"):
        load_model(tmp_path / "ck")


def test_cifar_memo_index_is_no_allocation(tmp_path):
    """A damaged batch naming memo slot 2^24 (the C unpickler would size a table by it: 2^32 took minutes and
    tens of GB) reads in bounded memory."""
    from igpt.cifar import cifar_source

    f = tmp_path / "data_batch_1"
    f.write_bytes(b"\x80\x02}r" + (1 << 24).to_bytes(4, "little") + b".")  # PROTO 2, {}, LONG_BINPUT 2^24, STOP
    assert peak_mib(lambda: cifar_source(f)) < 16
    assert "data_batch_1: 'data' must be a uint8 array" in peak_mib.last
