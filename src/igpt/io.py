"""Atomic file and directory writes: a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from igpt.errors import IgptError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path`` in one rename.

    On any error (or interruption) the temporary directory is removed and ``path`` keeps what it had. An
    existing ``path`` is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(path: Path, markers: tuple[str, ...]) -> None:
    """Refuse to overwrite something that is not an (old) output of ours: a file, or a non-empty directory
    holding none of ``markers`` (the files our own outputs always have). Replacing a directory deletes
    it, so a wrong --out must not cost data."""
    if not path.exists():
        return
    if not path.is_dir():
        raise IgptError(f"{path} exists and is not a directory; choose another output path")
    entries = list(path.iterdir())
    if entries and not any((path / m).is_file() for m in markers):
        raise IgptError(f"{path} is a non-empty directory that igpt did not write; refusing to replace it")


def read_json(path: str | Path):
    """Parse a JSON file; ``IgptError`` naming the file when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IgptError(f"{path}: missing") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise IgptError(f"{path}: not readable JSON ({e})") from None


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (100 dpi, tight), closing the figure; write them with atomic_write_bytes."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
