"""Atomic file and directory writes: a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from igpt.errors import IgptError

try:
    import fcntl
except ImportError:  # not POSIX: outputs are not locked (output_lock)
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_default(path: str | Path) -> None:
    """Give a file written by a library that creates it 0600 (safetensors does) the usual umask permissions."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` ('.NAME.<host>-<pid>.<random>.tmp'), fsync it, then
    rename it over ``path``."""
    path = Path(path)
    check_file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)  # what a killed writer of the same file left (eval.json, probe.json, a PNG, ...)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_owner()}.", suffix=".tmp")
    except OSError as e:  # the folder does not take files (read-only, no permission, /proc ...)
        raise OSError(e.errno, e.strerror, str(path)) from None
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


def check_file_target(path: Path) -> None:
    """IgptError when ``path`` is a folder, or exists and is not a regular file: the rename of an atomic write
    replaces what is there, so `--out /dev/null` (run as root) replaced the device with a PNG."""
    if path.is_dir():
        raise IgptError(f"{path} is a folder; give the name of a file to write")
    if path.exists() and not path.is_file():
        raise IgptError(f"{path} is not a regular file (a device, pipe or socket); give the name of a file to write")


def check_writable(path: str | Path) -> None:
    """IgptError unless a file can be written at ``path`` (its folder exists or can be made, and takes a file:
    tried with a temporary file, which root's permission bypass makes the only sure test)."""
    path = Path(path)
    check_file_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise IgptError(f"{path}: cannot write there ({e.strerror or e})") from None


def remove_stale_temporaries(folder: str | Path, names) -> list[Path]:
    """Delete the temporaries ``atomic_write_bytes`` leaves beside each of ``names`` in ``folder`` when a
    process is killed between writing and renaming (".config.json.<random>.tmp"); nothing else. Call it only
    while no other process writes there. Returns what was removed."""
    gone = []
    for name in names:
        for junk in _temporaries(Path(folder), name):
            if junk.is_file():
                junk.unlink(missing_ok=True)
                gone.append(junk)
    return gone


def _temporaries(folder: Path, name: str):
    """The temporaries atomic_write_bytes makes beside ``folder / name``: '.NAME.<host>-<pid>.<random>.tmp' (and
    '.NAME.<random>.tmp' before the fourteenth session)."""
    return folder.glob(f".{glob.escape(name)}.*.tmp")


def _owner() -> str:
    """'<host>-<pid>': which process made a temporary (atomic_dir's and atomic_write_bytes' names carry it)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a pid past the C int range names no process; it was a traceback)
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


def remove_orphans(path: Path) -> list[Path]:
    """Delete the temporaries (directories of atomic_dir, files of atomic_write_bytes) that writes to ``path``
    left beside it when their process was killed (SIGKILL, power loss: no ``finally`` ran):
    '.NAME.<host>-<pid>.<random>.tmp' made on this host by a process that no longer exists. Another host's (a
    shared disk) or a live process's are kept. Returns them."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(.+)-(\d+)\.[^.]+\.tmp$")
    host, gone = socket.gethostname(), []
    for d in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = pattern.match(d.name)
        if not m or m.group(1) != host or _alive(int(m.group(2))):
            continue
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.unlink(missing_ok=True)
        gone.append(d)
    return gone


@contextmanager
def atomic_dir(path: str | Path, follow_symlink: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path`` in one rename.

    On any error (or interruption) the temporary directory is removed and ``path`` keeps what it had. An
    existing ``path`` is moved aside first and deleted only after the new one is in place. A symlink at
    ``path``: its target is replaced (a user's --out), or with ``follow_symlink=False`` (names inside a folder
    of ours, such as a run's step-NNNNNN) the link alone is removed, never what it points to.
    """
    path = Path(path)
    if path.is_symlink() and not follow_symlink:  # a link planted inside our folder: replacing its target
        path.unlink()  # deleted a folder outside the run
    if path.is_symlink():  # the folder it names is replaced (a temporary beside the link was left behind, the
        path = Path(os.path.realpath(path))  # link itself became a folder and the target kept the old files)
    if Path.cwd().resolve().is_relative_to(path.resolve()):  # '.' or above: the final rename could only fail
        raise IgptError(f"{path}: the folder you are working in (or one above it) cannot be replaced; give the "
                        "output a new folder name")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_owner()}.", suffix=".tmp"))
    except OSError as e:  # the folder does not take files: name the output, not the hidden temporary
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        for d in sorted((d for d in tmp.rglob("*") if d.is_dir()), reverse=True) + [tmp]:
            fsync_dir(d)  # the directories' entries too, before the rename makes them the new ``path``
        old = None
        if not path.exists():
            os.replace(tmp, path)
        elif not exchange(tmp, path):  # (exchanged: ``path`` is the new version, tmp the old, removed below)
            # no atomic swap on this system: the old version moves aside first (a crash in between leaves it
            # there, under its .old name, and ``path`` missing)
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` while the block runs: a second igpt process given the same
    output stops at once with one line (two trainings had interleaved their checkpoints in one run folder and
    pruned each other's; a second demo deleted the folder the first was writing).

    The lock is an advisory ``flock`` on a hidden file beside the output, '.NAME.lock' (the output folder itself
    may be replaced by a rename, and a lock on a folder it replaced would guard nothing). The file stays: removing
    it would let a third process lock a new file while a second still holds the old one. A symlinked output locks
    the folder it names. Under torchrun only global rank 0 locks (the ranks of one job share its outputs).
    Where the lock file cannot be made or the file system has no locks, nothing is locked (the writes report
    their own errors).
    """
    fd = None if os.environ.get("RANK", "0") not in ("", "0") else _lock_file(Path(os.path.realpath(path)))
    if fd is None:
        yield
        return
    try:
        _hold(fd, path)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_file(target: Path) -> int | None:
    """An open descriptor of '.NAME.lock' beside ``target``, or None where no lock can be had."""
    if fcntl is None or (target.exists() and not target.is_dir()):  # outputs locked are folders: a file, device
        return None  # or pipe there is refused by the command itself, and had left a stray '.NAME.lock' beside it
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_umask())
    except OSError:
        return None


def _hold(fd: int, path) -> None:
    """Lock ``fd`` and record who holds it ('<host> <pid>'); IgptError naming the holder if another process does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        who = f" (pid {holder[1]} on {holder[0]})" if len(holder) == 2 else ""
        raise IgptError(f"{path}: another igpt process{who} is writing this output; wait for it to end or "
                        "choose another --out") from None
    except OSError:  # no locks on this file system (ENOLCK, EOPNOTSUPP): unlocked, as where none can be made
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2, or None (not Linux, or a libc without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE): a crash leaves one or
    the other arrangement, never ``b`` missing. False where the system or the file system cannot swap."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # not supported here: fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_replaceable(path: Path, markers: dict[str, str | tuple[str, object] | Callable[[dict], bool]]) -> None:
    """Refuse to overwrite something that is not an (old) output of ours: a file, or a non-empty directory
    without one of ``markers`` ({JSON file our outputs always have: a key it always holds, (key, value), or a
    test of the JSON object}).
    A file of that name alone is not enough: `config.json` is a common name (a Hugging Face model folder, a
    user's project). Replacing a directory deletes it, so a wrong --out must not cost data."""
    if not path.exists():
        return
    if not path.is_dir():
        raise IgptError(f"{path} exists and is not a directory; choose another output path")
    entries = list(path.iterdir())
    # a marker of ours, or the temporary of one that atomic_write_bytes left when killed before its rename
    # (the first write of a run): both mean the directory is ours
    ours = any(_json_has(path / m, key) or any(_temporaries(path, m)) for m, key in markers.items())
    if entries and not ours:
        raise IgptError(f"{path} is a non-empty directory that igpt did not write; refusing to replace it")


def _json_has(f: Path, key: str | tuple[str, object] | Callable[[dict], bool]) -> bool:
    """Whether ``f`` is a JSON object file with ``key`` (a (key, value) pair: with that value; a callable: that
    it accepts the object); False for anything else, unreadable included."""
    try:
        d = json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    if callable(key):
        return isinstance(d, dict) and bool(key(d))
    if isinstance(key, tuple):
        return isinstance(d, dict) and key[0] in d and d[key[0]] == key[1]
    return isinstance(d, dict) and key in d


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` for json.loads: ValueError for a name given twice in one object. Python's json keeps
    the last silently, so `"lr": 0.1, ... "lr": 0.001` in a --config file (or two n_head in a checkpoint's
    config.json) ran with whichever came last; TOML refuses such a file, and so does igpt now for JSON."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"{k!r} is given twice in one object")
        d[k] = v
    return d


def read_json(path: str | Path):
    """Parse a JSON file; ``IgptError`` naming the file when it is missing or not valid JSON (a name given twice in
    one object included)."""
    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise IgptError(f"{path}: missing") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:  # (RecursionError: deeply nested)
        raise IgptError(f"{path}: not readable JSON ({e})") from None


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (100 dpi, tight), closing the figure; write them with atomic_write_bytes."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# What parsing a damaged or hostile .npy / .npz can raise inside numpy, zipfile and zlib (the header is parsed
# as a Python literal: SyntaxError, tokenize.TokenError); readers turn these into an IgptError naming the file.
NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, TypeError, KeyError, IndexError,
              AttributeError, OverflowError, MemoryError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error,
              zipfile.LargeZipFile, RuntimeError, NotImplementedError)  # (zipfile: encrypted, unknown compression)


def check_npy_header(f, where: str, available: int) -> None:
    """Read the .npy header at ``f``'s position and refuse, before anything is allocated, an array that would
    hold Python objects or more bytes than the ``available`` bytes of the file after the header (a header
    claiming 10^12 pixels in a 1 kB file)."""
    import numpy as np
    from numpy.lib import format as fmt

    start = f.tell()
    try:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0  # np.load's parser
        shape, _, dtype = read(f)
    except NPY_ERRORS as e:
        raise IgptError(f"{where}: not a valid .npy array ({e})") from None
    if dtype.hasobject:
        raise IgptError(f"{where}: holds Python objects (pickled); only plain numeric arrays are read")
    need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    left = available - (f.tell() - start)
    if need > left:
        raise IgptError(f"{where}: header declares a {dtype} array of shape {tuple(shape)} ({need:,} bytes) but "
                        f"the file holds {max(left, 0):,} bytes of data")


def check_npy_file(path: Path) -> None:
    """check_npy_header for a .npy file, or for every member of a .npz."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    with z.open(info) as f:
                        check_npy_header(f, f"{path}[{info.filename}]", info.file_size)
            return
        with open(path, "rb") as f:
            check_npy_header(f, str(path), os.fstat(f.fileno()).st_size)
    except IgptError:
        raise
    except NPY_ERRORS as e:
        raise IgptError(f"{path}: not a readable numpy file ({e})") from None
