"""The TensorFlow V2 checkpoint reader, against small checkpoints that TensorFlow itself wrote
(tests/fixtures/openai/make_fixtures.py lists what is in them)."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from igpt import tfcheckpoint as tfc
from igpt.crc32c import crc32c
from igpt.errors import IgptError
from igpt.tfcheckpoint import TFCheckpoint, checkpoint_prefix

FIX = Path(__file__).parent / "fixtures" / "openai"
AR = FIX / "ar" / "model.ckpt-7"
BERT = FIX / "bert" / "model.ckpt-3"


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIX / "expected.npz", allow_pickle=False))


@pytest.fixture
def ar_copy(tmp_path) -> Path:
    for f in AR.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / AR.name


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_ordered_code_signed_numbers_keep_their_order():
    vals = sorted({0, 1, -1, 63, 64, -64, -65, 8191, 8192, 2**31, -(2**31), 2**62, -(2**63), 2**63 - 1,
                   *range(-300, 300, 7)})
    enc = [tfc._signed_num_increasing(v) for v in vals]
    assert enc == sorted(enc)
    assert tfc._signed_num_increasing(0) == b"\x80" and tfc._signed_num_increasing(-1) == b"\x7f"
    assert tfc.slice_key("a", ((0, -1),)) == b"\x00a\x00\x01\x01\x01\x80\x7f"


def test_lists_names_dtypes_and_shapes_without_the_data_files(tmp_path):
    shutil.copy(AR.with_name(AR.name + ".index"), tmp_path / (AR.name + ".index"))
    ck = TFCheckpoint(tmp_path / AR.name)
    assert ck.num_shards == 3
    infos = ck.infos()
    want = {"extra/float16": ("float16", (3, 5)), "extra/bfloat16": ("bfloat16", (2, 4)),
            "extra/int32": ("int32", (4,)), "extra/int64_big": ("int64", (2,)), "extra/empty": ("float32", (0, 3)),
            "extra/scalar": ("float32", ()), "extra/flag": ("bool", (3,)), "global_step": ("int64", ()),
            "model/wte": ("float32", (16, 12)), "model/h10/attn/q_proj": ("float32", (2, 6, 12)),
            "model/wte/Adam": ("float32", (16, 12))}
    for name, (dtype, shape) in want.items():
        assert (infos[name].dtype, infos[name].shape) == (dtype, shape), name
    assert infos["model/wte"].sliced and infos["extra/part2d"].sliced and not infos["model/wpe"].sliced
    assert all(not n.startswith("\x00") for n in infos)  # slice pieces are not listed as tensors
    with pytest.raises(IgptError, match=r"data-0000\d-of-00003: cannot read tensor 'model/"):
        for n in ck.names():
            if n.startswith("model/"):
                ck.read(n)


def test_reads_every_dtype_scalars_empties_and_partitions(expected):
    ck = TFCheckpoint(AR)
    for key, want in expected.items():
        if not key.startswith("extra__") or key == "extra__flag":
            continue
        got = ck.read(key.replace("__", "/"))
        assert got.shape == want.shape, key
        assert got.dtype == (np.float32 if want.dtype.kind == "f" else want.dtype), key
        np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=key)
    assert ck.read("extra/scalar").shape == () and ck.read("global_step") == 7
    np.testing.assert_array_equal(ck.read("model/wte"), expected["ar_wte"])  # 3 row pieces reassembled
    assert not ck.read("model/wte/Adam").any()  # a partitioned slot variable reads too
    for name in ck.names():  # every readable tensor in all three shards passes its checksum
        if ck.info(name).dtype != "bool":
            ck.read(name)


def test_bert_checkpoint_single_shard():
    ck = TFCheckpoint(BERT)
    assert ck.num_shards == 1 and "model/sos" not in ck and len(ck.names()) == 4 + 8 * 11
    assert ck.read("model/h2/attn/c_proj").shape == (3, 4, 12)


def test_unsupported_dtype_names_it_and_the_tensor():
    with pytest.raises(IgptError, match=r"'extra/flag' has dtype bool"):
        TFCheckpoint(AR).read("extra/flag")
    with pytest.raises(IgptError, match="no tensor named 'nope'"):
        TFCheckpoint(AR).read("nope")


def test_prefix_forms(tmp_path):
    assert checkpoint_prefix(AR.with_name(AR.name + ".index")) == AR
    assert checkpoint_prefix(AR.with_name(AR.name + ".data-00001-of-00003")) == AR
    assert checkpoint_prefix(AR.parent) == AR
    with pytest.raises(IgptError, match="missing"):
        TFCheckpoint(tmp_path / "model.ckpt-1")
    with pytest.raises(IgptError, match="found 0"):
        checkpoint_prefix(tmp_path)


def test_corrupt_data_names_file_and_tensor(ar_copy):
    ck = TFCheckpoint(ar_copy)
    e = ck._entries[b"model/wpe"]
    shard = ck.shard_path(e.shard_id)
    _flip(shard, e.offset + 5)
    with pytest.raises(IgptError, match=rf"{shard.name}: checksum mismatch for tensor 'model/wpe'"):
        ck.read("model/wpe")
    ck.read("model/wtet")  # the others still read
    assert TFCheckpoint(ar_copy, verify=False).read("model/wpe").shape == (16, 12)


def test_truncated_data_names_file_and_tensor(ar_copy):
    ck = TFCheckpoint(ar_copy)
    name, e = max(((n, ck._entries[n.encode()]) for n in ck.names() if ck._entries[n.encode()].shard_id == 2
                   and ck._entries[n.encode()].size and not ck.info(n).sliced), key=lambda kv: kv[1].offset)
    shard = ck.shard_path(2)
    shard.write_bytes(shard.read_bytes()[: e.offset + e.size - 3])
    with pytest.raises(IgptError, match=rf"{shard.name}: truncated: tensor '{name}'"):
        ck.read(name)


def test_corrupt_or_truncated_index(ar_copy):
    index = ar_copy.with_name(ar_copy.name + ".index")
    good = index.read_bytes()
    _flip(index, 20)  # inside the first data block
    with pytest.raises(IgptError, match=rf"{index.name}: checksum mismatch in the data block"):
        TFCheckpoint(ar_copy)
    index.write_bytes(good[: len(good) - 10])
    with pytest.raises(IgptError, match="no table magic number"):
        TFCheckpoint(ar_copy)
    index.write_bytes(good[:-48][: len(good) // 2] + good[-48:])  # footer kept, blocks cut
    with pytest.raises(IgptError, match=rf"{index.name}: (truncated|checksum)"):
        TFCheckpoint(ar_copy)


def test_compressed_block_is_refused_clearly(ar_copy):
    """A snappy-compressed block (type 1 with a valid checksum) gets its own message, not a checksum error."""
    index = ar_copy.with_name(ar_copy.name + ".index")
    data = bytearray(index.read_bytes())
    footer = bytes(data[-tfc.FOOTER_SIZE:])
    p = tfc._varint(footer, tfc._varint(footer, 0)[1])[1]
    index_off, p = tfc._varint(footer, p)
    index_size, _ = tfc._varint(footer, p)
    first = tfc._block_entries(tfc._block(bytes(data), (index_off, index_size), index, "index block"))[0][1]
    off, q = tfc._varint(first, 0)
    size, _ = tfc._varint(first, q)
    data[off + size] = 1
    crc = crc32c(bytes(data[off:off + size + 1]))
    masked = ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    data[off + size + 1:off + size + 5] = masked.to_bytes(4, "little")
    index.write_bytes(bytes(data))
    with pytest.raises(IgptError, match=rf"{index.name}: the data block is compressed \(type 1"):
        TFCheckpoint(ar_copy)




def test_crafted_indexes_are_one_line_errors(tmp_path):
    """Hostile or damaged entries, each written with a real (valid) table around it: a field of the wrong wire
    type, a size far beyond the data file (checked before any allocation), a shape whose element count wraps
    int64, overlapping slices, and a tensor without a checksum (TensorFlow checks such data against 0 too)."""
    from tf_writer import entry, field, write

    data = np.arange(4, dtype="<f4").tobytes()
    good = entry(dims=(4,), size=16, crc=crc32c(data))
    assert np.array_equal(TFCheckpoint(write(tmp_path / "ok", {b"x": good}, [data])).read("x"), np.arange(4))
    cases = {
        "wire": ({b"x": field(1, 1) + field(3, b"\x00")}, [data], "malformed bundle entry"),
        "huge": ({b"x": entry(dims=(2**37,), size=2**39)}, [data], "truncated: tensor 'x' needs bytes"),
        "wrap": ({b"x": entry(dims=(2**32, 2**32), size=0)}, [data], "0 bytes for float32"),
        "nocrc": ({b"x": entry(dims=(4,), size=16)}, [data], "checksum mismatch for tensor 'x'"),
    }
    half = np.arange(2, dtype="<f4").tobytes()
    from igpt.tfcheckpoint import slice_key

    piece = entry(dims=(2,), size=8, crc=crc32c(half))
    cases["overlap"] = ({b"x": entry(dims=(4,), slices=[((0, 2),), ((0, 2),)]), slice_key("x", ((0, 2),)): piece},
                        [half * 4], "overlaps another slice")
    for name, (entries, files, message) in cases.items():
        with pytest.raises(IgptError, match=message):
            TFCheckpoint(write(tmp_path / name, entries, files)).read("x")
    for name, items in (("twice", [(b"x", good), (b"x", good)]), ("order", [(b"y", good), (b"x", good)])):
        with pytest.raises(IgptError, match="repeated or out of order"):  # which one would count?
            TFCheckpoint(write(tmp_path / name, items, [data]))
    with pytest.raises(IgptError, match="bundle header says"):  # the shard count as bytes
        TFCheckpoint(write(tmp_path / "hdr", {b"x": good}, [data], header=field(1, b"\x01")))
