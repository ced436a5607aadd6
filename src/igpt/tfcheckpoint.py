"""Read TensorFlow V2 checkpoints (``PREFIX.index`` + ``PREFIX.data-SSSSS-of-NNNNN``) without TensorFlow.

The format (tensorflow/core/util/tensor_bundle):
  - ``PREFIX.index`` is a LevelDB-style sorted table: data blocks of prefix-compressed keys with restart
    points, an index block pointing at them, a metaindex block and a 48-byte footer ending in the table magic
    number. Every block is followed by a 5-byte trailer: a compression byte and the masked CRC32C of the block
    and that byte. Every block's checksum is verified when the index is opened.
  - The empty key holds a BundleHeaderProto (num_shards, endianness, version); every other key is a tensor
    name holding a BundleEntryProto (dtype, shape, shard_id, offset, size, masked crc32c, slices). The few
    protobuf fields needed are decoded by hand here (no tensorflow, no protobuf package).
  - A partitioned variable's entry has ``slices`` and no data; each piece is an entry of its own under the
    key ``checkpoint::EncodeTensorNameSlice(name, slice)`` (an OrderedCode string), reassembled here.

``TFCheckpoint(prefix)`` parses only the index: ``infos()`` lists names, dtypes and shapes without touching
the data files; ``read(name)`` seeks to one tensor and reads just its bytes (verifying its CRC32C unless
``verify=False``). Returned arrays are numpy: float32 for float32, float16 and bfloat16 tensors (upcast,
exactly), int32 and int64 as themselves; any other dtype is an IgptError naming it and the tensor.
Problems with the files (missing, truncated, corrupt, inconsistent) are IgptErrors naming file and tensor.
Checksums: ``igpt.crc32c``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt.crc32c import crc32c, unmask_crc
from igpt.errors import IgptError

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's kTableMagicNumber, which TF's table keeps
FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic number
# TF DataType enum -> (name, numpy dtype of the stored little-endian bytes); only these can be read
DTYPES = {1: ("float32", "<f4"), 3: ("int32", "<i4"), 9: ("int64", "<i8"), 14: ("bfloat16", "<u2"),
          19: ("float16", "<f2")}
OTHER_DTYPES = {2: "float64", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64", 10: "bool",
                11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16", 17: "uint16",
                18: "complex128", 20: "resource", 21: "variant", 22: "uint32", 23: "uint64"}


# -- protobuf wire format and varints -----------------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """[(field number, int value or bytes)] of one protobuf message; groups are not used by these messages."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, pos = _varint(buf, pos)
        elif wire == 1:
            v, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 5:
            v, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            v, pos = bytes(buf[pos:pos + n]), pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        out.append((num, v))
    return out


def _int64(v: int) -> int:  # protobuf int64 varints carry negative values as 64-bit two's complement
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # float32, float16, bfloat16, int32, int64, or the name of an unsupported TF dtype
    shape: tuple[int, ...]
    sliced: bool  # a partitioned variable, stored as pieces


@dataclass
class _Entry:
    dtype: int = 1
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int | None = None
    slices: tuple[tuple[tuple[int, int], ...], ...] = ()  # per slice, per dim (start, length; -1 = all)


_ENTRY_TYPES = {1: int, 2: bytes, 3: int, 4: int, 5: int, 6: int, 7: bytes}  # field -> its wire value's type


def _parse_entry(buf: bytes) -> _Entry:
    e, slices = _Entry(), []
    for num, v in _fields(buf):
        if num in _ENTRY_TYPES and not isinstance(v, _ENTRY_TYPES[num]):
            raise ValueError(f"field {num} has the wrong wire type")
        if num == 1:
            e.dtype = v
        elif num == 2:
            e.shape = tuple(_int64(dict(_fields(d)).get(1, 0)) for n, d in _fields(v) if n == 2)
        elif num == 3:
            e.shard_id = v
        elif num == 4:
            e.offset = _int64(v)
        elif num == 5:
            e.size = _int64(v)
        elif num == 6:
            e.crc32c = unmask_crc(v)
        elif num == 7:
            extents = []
            for n, ext in _fields(v):
                if n == 1:
                    f = dict(_fields(ext))
                    extents.append((_int64(f.get(1, 0)), _int64(f[2]) if 2 in f else -1))
            slices.append(tuple(extents))
    e.slices = tuple(slices)
    if e.crc32c is None:  # proto3: an absent fixed32 is 0, and TensorFlow checks the data against it all the same
        e.crc32c = unmask_crc(0)
    return e


def slice_key(name: str, extents: tuple[tuple[int, int], ...]) -> bytes:
    """TF's checkpoint::EncodeTensorNameSlice: OrderedCode of (0, name, rank, start_0, length_0, ...)."""
    out = bytearray(b"\x00")  # WriteNumIncreasing(0)
    out += re.sub(rb"[\x00\xff]", lambda m: m[0] + bytes([m[0][0] ^ 0xFF]), name.encode()) + b"\x00\x01"
    out += _num_increasing(len(extents))
    for start, length in extents:
        out += _signed_num_increasing(start) + _signed_num_increasing(length)
    return bytes(out)


def _num_increasing(v: int) -> bytes:
    b = v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""
    return bytes([len(b)]) + b


def _signed_num_increasing(v: int) -> bytes:
    x = ~v if v < 0 else v
    n = 1 + x.bit_length() // 7  # encoded length in bytes (OrderedCode's kBitsToLength)
    raw = bytearray(v.to_bytes(10, "big", signed=True)[10 - n:])
    header = (0xFF << (8 - min(n, 8))) & 0xFF  # n leading one bits over the first byte(s)
    raw[0] ^= header if n <= 8 else 0xFF
    if n > 8:
        raw[1] ^= (0xFF << (16 - n)) & 0xFF
    return bytes(raw)


# -- the sorted table ---------------------------------------------------------------------------------------
def _block(data: bytes, handle: bytes | tuple[int, int], path: Path, what: str) -> bytes:
    """Contents of the block at ``handle`` (offset, size), its trailer checked."""
    if isinstance(handle, bytes | bytearray):
        off, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
    else:
        off, size = handle
    if off + size + 5 > len(data):
        raise IgptError(f"{path}: truncated ({what} at offset {off} runs past the end of the file)")
    contents, kind = data[off:off + size], data[off + size]
    stored = unmask_crc(int.from_bytes(data[off + size + 1:off + size + 5], "little"))
    if crc32c(data[off:off + size + 1]) != stored:
        raise IgptError(f"{path}: checksum mismatch in the {what} at offset {off} (corrupt index file)")
    if kind != 0:
        raise IgptError(f"{path}: the {what} is compressed (type {kind}, e.g. snappy), which is not supported; "
                        "TensorFlow writes checkpoint indexes uncompressed")
    return contents


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    n_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 * (n_restarts + 1)
    if n_restarts < 1 or end < 0:
        raise ValueError("bad restart array")
    out, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > end:
            raise ValueError("bad block entry")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        out.append((bytes(key), bytes(block[pos:pos + vlen])))
        pos += vlen
    return out


def read_table(path: Path) -> dict[bytes, bytes]:
    """Every key -> value of a LevelDB-format table file, all block checksums verified."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IgptError(f"{path}: cannot read the checkpoint index ({e.strerror or e})") from None
    if len(data) < FOOTER_SIZE or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise IgptError(f"{path}: not a TensorFlow checkpoint index (no table magic number; truncated?)")
    footer = data[-FOOTER_SIZE:]
    try:
        meta_off, p = _varint(footer, 0)
        meta_size, p = _varint(footer, p)
        index_off, p = _varint(footer, p)
        index_size, p = _varint(footer, p)
        _block(data, (meta_off, meta_size), path, "metaindex block")
        table = {}
        for _, handle in _block_entries(_block(data, (index_off, index_size), path, "index block")):
            for key, value in _block_entries(_block(data, handle, path, "data block")):
                if table and key <= next(reversed(table)):  # a table's keys are unique and sorted
                    raise ValueError(f"key {key[:60]!r} repeated or out of order")
                table[key] = value
    except ValueError as e:
        raise IgptError(f"{path}: malformed index ({e})") from None
    return table


# -- the bundle ---------------------------------------------------------------------------------------------
def checkpoint_prefix(path: str | Path) -> Path:
    """PREFIX from PREFIX, PREFIX.index, a data file, or a folder holding exactly one *.index."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.index"))
        if len(found) != 1:
            raise IgptError(f"{p}: expected one TensorFlow checkpoint (*.index) in the folder, found {len(found)}")
        return found[0].with_suffix("")
    name = p.name
    if name.endswith(".index"):
        return p.with_name(name.removesuffix(".index"))
    if ".data-" in name:
        return p.with_name(name.split(".data-")[0])
    return p


class TFCheckpoint:
    """A TF V2 checkpoint opened lazily: the index is parsed, data files are only opened by ``read``."""

    def __init__(self, prefix: str | Path, verify: bool = True):
        self.prefix, self.verify = checkpoint_prefix(prefix), verify
        self.index_path = self.prefix.with_name(self.prefix.name + ".index")
        if not self.index_path.is_file():
            raise IgptError(f"{self.index_path}: missing (is {self.prefix} a TensorFlow checkpoint prefix?)")
        table = read_table(self.index_path)
        try:
            header = dict(_fields(table.pop(b"")))
            self._entries = {k: _parse_entry(v) for k, v in table.items()}
        except KeyError:
            raise IgptError(f"{self.index_path}: no bundle header (not a V2 checkpoint index)") from None
        except (ValueError, IndexError, TypeError) as e:
            raise IgptError(f"{self.index_path}: malformed bundle entry ({e})") from None
        for k, e in self._entries.items():  # a saved tensor's shape is fully known: -1 (unknown) is damage
            if any(d < 0 for d in e.shape):
                raise IgptError(f"{self.index_path}: tensor {k.decode('utf-8', 'replace')!r} has shape {e.shape}, "
                                "with a negative dimension")
        self.num_shards = header.get(1, 0)
        self.big_endian = header.get(2, 0) == 1
        if not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise IgptError(f"{self.index_path}: bundle header says {self.num_shards} shards")
        self._names = sorted(k.decode("utf-8", "replace") for k in self._entries if not k.startswith(b"\x00"))

    def shard_path(self, shard: int) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard:05d}-of-{self.num_shards:05d}")

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name.encode() in self._entries

    def info(self, name: str) -> TensorInfo:
        e = self._entry(name)
        dtype = DTYPES[e.dtype][0] if e.dtype in DTYPES else OTHER_DTYPES.get(e.dtype, f"dtype #{e.dtype}")
        return TensorInfo(name, dtype, e.shape, bool(e.slices))

    def infos(self) -> dict[str, TensorInfo]:
        return {n: self.info(n) for n in self._names}

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name.encode()]
        except KeyError:
            raise IgptError(f"{self.index_path}: no tensor named {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        """One tensor as numpy (float32 for float16/bfloat16), read with one seek per stored piece."""
        e = self._entry(name)
        if e.dtype not in DTYPES:
            raise IgptError(f"{self.index_path}: tensor {name!r} has dtype {self.info(name).dtype}, which igpt "
                            "cannot read (float32, float16, bfloat16, int32 and int64 only)")
        if not e.slices:
            return self._read_piece(e, e.shape, name)
        return self._reassemble(name, e)

    def _reassemble(self, name: str, e: _Entry) -> np.ndarray:
        """A partitioned variable from its pieces (each under its slice key, with its own checksum)."""
        code = DTYPES[e.dtype][1]
        dtype = np.float32 if np.dtype(code).kind in "fu" else code  # u2: bfloat16
        pieces = (self._entries.get(slice_key(name, extents)) for extents in e.slices)
        shards = {p.shard_id for p in pieces if p is not None and 0 <= p.shard_id < self.num_shards}
        on_disk = sum(p.stat().st_size for p in map(self.shard_path, sorted(shards)) if p.is_file())
        if any(d < 0 for d in e.shape) or math.prod(e.shape) * np.dtype(code).itemsize > on_disk:
            raise IgptError(f"{self.index_path}: tensor {name!r}: shape {e.shape} does not fit the data files")
        out = np.zeros(e.shape, dtype=dtype)
        seen = np.zeros(e.shape, dtype=bool)  # each value must come from exactly one slice
        for extents in e.slices:
            if len(extents) != len(e.shape):
                raise IgptError(f"{self.index_path}: tensor {name!r}: a slice of rank {len(extents)} for shape {e.shape}")
            region = tuple(slice(None) if ln == -1 else slice(s, s + ln) for s, ln in extents)
            shape = tuple(dim if ln == -1 else ln for (_, ln), dim in zip(extents, e.shape, strict=True))
            if any(ln != -1 and (s < 0 or s + ln > dim) for (s, ln), dim in zip(extents, e.shape, strict=True)):
                raise IgptError(f"{self.index_path}: tensor {name!r}: slice {extents} outside shape {e.shape}")
            key = slice_key(name, extents)
            piece = self._entries.get(key)
            if piece is None:
                raise IgptError(f"{self.index_path}: tensor {name!r}: the piece for slice {extents} is missing")
            if piece.dtype != e.dtype or tuple(piece.shape) != shape:
                raise IgptError(f"{self.index_path}: tensor {name!r}: slice {extents} is stored as {piece.shape}, "
                                f"expected {shape}")
            if seen[region].any():
                raise IgptError(f"{self.index_path}: tensor {name!r}: slice {extents} overlaps another slice")
            out[region] = self._read_piece(piece, shape, f"{name} slice {extents}")
            seen[region] = True
        if not seen.all():
            raise IgptError(f"{self.index_path}: tensor {name!r}: its slices cover {int(seen.sum())} of {out.size} "
                            "values")
        return out

    def _read_piece(self, e: _Entry, shape: tuple[int, ...], what: str) -> np.ndarray:
        """The bytes of one stored entry -> array of ``shape``; ``what`` names it in errors."""
        if not 0 <= e.shard_id < self.num_shards:
            raise IgptError(f"{self.index_path}: tensor {what!r} is in shard {e.shard_id} of {self.num_shards}")
        tname, code = DTYPES[e.dtype]
        count = math.prod(shape)  # Python ints: no int64 wrap-around for absurd shapes
        if any(d < 0 for d in shape) or e.size != count * np.dtype(code).itemsize:
            raise IgptError(f"{self.index_path}: tensor {what!r}: {e.size} bytes for {tname} {shape}")
        path = self.shard_path(e.shard_id)
        try:
            with open(path, "rb") as f:
                if e.offset < 0 or e.offset + e.size > os.fstat(f.fileno()).st_size:  # before allocating anything
                    raise IgptError(f"{path}: truncated: tensor {what!r} needs bytes {e.offset}..{e.offset + e.size}, "
                                    f"the file ends first")
                f.seek(e.offset)
                raw = f.read(e.size)
        except OSError as err:
            raise IgptError(f"{path}: cannot read tensor {what!r} ({err.strerror or err})") from None
        if len(raw) != e.size:
            raise IgptError(f"{path}: truncated: tensor {what!r} needs bytes {e.offset}..{e.offset + e.size}, "
                            f"the file ends first")
        if self.verify and crc32c(raw) != e.crc32c:
            raise IgptError(f"{path}: checksum mismatch for tensor {what!r} (corrupt data file)")
        a = np.frombuffer(raw, dtype=np.dtype(code).newbyteorder(">" if self.big_endian else "<"), count=count)
        if tname == "bfloat16":  # the top half of a float32: widen exactly
            a = (a.astype(np.uint32) << 16).view(np.float32)
        elif tname == "float16":
            a = a.astype(np.float32)
        return a.astype(a.dtype.newbyteorder("="), copy=True).reshape(shape)
