"""A minimal writer of TensorFlow V2 checkpoint bundles (an uncompressed one-block index table plus data files),
for crafting damaged or hostile inputs to igpt.tfcheckpoint in tests. Protobuf fields are written by hand:
``field(num, value)`` is a varint for ints and a length-delimited field for bytes."""

from __future__ import annotations

from pathlib import Path

from igpt.crc32c import crc32c

TABLE_MAGIC = 0xDB4775248B80FB57


def mask(c: int) -> int:
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def varint(v: int) -> bytes:
    v += (1 << 64) if v < 0 else 0
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def field(num: int, v: int | bytes) -> bytes:
    if isinstance(v, bytes):
        return varint(num << 3 | 2) + varint(len(v)) + v
    return varint(num << 3) + varint(v)


def entry(dtype: int = 1, dims=(), shard: int = 0, offset: int = 0, size: int = 0, crc: int | None = None,
          slices=()) -> bytes:
    """A BundleEntryProto; ``crc`` the raw crc32c of the data (masked here), None to leave the field out;
    ``slices``: per slice, per dim (start, length or -1 for all)."""
    shape = b"".join(field(2, field(1, d)) for d in dims)
    b = field(1, dtype) + field(2, shape) + field(3, shard) + field(4, offset) + field(5, size)
    if crc is not None:
        b += varint(6 << 3 | 5) + mask(crc).to_bytes(4, "little")
    for sl in slices:
        b += field(7, b"".join(field(1, field(1, s) + (field(2, n) if n != -1 else b"")) for s, n in sl))
    return b


def _block(items) -> bytes:
    body = bytearray()
    for k, v in items:  # no prefix sharing: shared 0, then the whole key
        body += varint(0) + varint(len(k)) + varint(len(v)) + k + v
    return bytes(body) + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")  # one restart point at 0


def _table(kv: dict[bytes, bytes] | list[tuple[bytes, bytes]]) -> bytes:
    data = bytearray()

    def put(b: bytes) -> bytes:  # a block, its type byte (0: uncompressed) and masked crc; -> its handle
        off = len(data)
        data.extend(b + b"\x00" + mask(crc32c(b + b"\x00")).to_bytes(4, "little"))
        return varint(off) + varint(len(b))

    items = sorted(kv.items()) if isinstance(kv, dict) else list(kv)  # a list: in its own order, repeats kept
    handle = put(_block(items))
    meta = put(_block([]))
    index = put(_block([(items[-1][0] + b"\xff", handle)]))
    return bytes(data) + (meta + index).ljust(40, b"\x00") + TABLE_MAGIC.to_bytes(8, "little")


def write(prefix: Path, entries: dict[bytes, bytes] | list[tuple[bytes, bytes]], data: list[bytes],
          header: bytes | None = None) -> Path:
    """PREFIX.index and PREFIX.data-0000i-of-0000n (n = len(data)); returns the prefix. ``entries`` as a list of
    (key, value) is written in that order, repeats included (a damaged table)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    head = field(1, len(data)) if header is None else header
    kv = {b"": head, **entries} if isinstance(entries, dict) else [(b"", head), *entries]
    prefix.with_name(prefix.name + ".index").write_bytes(_table(kv))
    for i, d in enumerate(data):
        prefix.with_name(f"{prefix.name}.data-{i:05d}-of-{len(data):05d}").write_bytes(d)
    return prefix
