"""CRC32C: the check value, the numpy and Python fallbacks against each other, the optional package."""

from __future__ import annotations

import sys
import types

import numpy as np

import igpt.crc32c as C


def test_crc32c_known_value_and_fallbacks_agree():
    assert C._crc32c_python(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert C.crc32c(b"123456789") == 0xE3069283
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 1023, 1024, 1025, 4096, 70_001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert C._crc32c_numpy(data) == C._crc32c_python(data), n
    assert C.unmask_crc(0xA282EAD8) == 0  # mask(0) = rot15(0) + delta


def test_crc_package_is_used_when_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "google_crc32c", types.SimpleNamespace(value=lambda data: 12345))
    C._backend.cache_clear()
    try:
        assert C.crc32c(b"abc") == 12345
    finally:
        C._backend.cache_clear()
