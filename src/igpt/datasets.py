"""Named data sets and ``open_source``: the one function that turns a ``--data`` argument into a Source.

A named data set is found, in this order: ``--data-dir DIR`` / ``$IGPT_DATA_DIR`` (``DIR/<name>/`` with the
original file names); Debian's packaged copy under ``/usr/share/datasets/<name>``; the user cache
(``$IGPT_CACHE_DIR`` or ``~/.cache/igpt``), downloading from the canonical public location there (checksum
verified) when it is missing. ``$IGPT_DATASET_MIRROR`` replaces the canonical base URL (a local mirror).
``fashion-mnist-mini`` is bundled inside the package and needs none of this.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from igpt.cifar import cifar_source
from igpt.data import Source, array_source, folder_source, idx_split
from igpt.errors import IgptError
from igpt.images import IMAGE_EXTS
from igpt.io import atomic_write_bytes

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
IDX_FILES = {  # role -> original file name (a plain, un-gzipped copy without .gz is accepted too)
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class Named:
    kind: str  # "idx" or "cifar"
    urls: tuple[str, ...]  # base URLs (idx: the folder; cifar: the archive), tried in order
    checksums: dict[str, str]  # file name -> "md5:<hex>" or "sha256:<hex>" of the canonical download
    class_names: tuple[str, ...] | None = None


NAMED: dict[str, Named] = {
    "fashion-mnist": Named(
        "idx",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {"train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310"},
        tuple(FASHION_CLASSES),
    ),
    "mnist": Named(
        "idx",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {"train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c"},
        tuple(str(i) for i in range(10)),
    ),
    "cifar10": Named(
        "cifar",
        ("https://www.cs.toronto.edu/~kriz/",),
        {"cifar-10-python.tar.gz": "md5:c58f30108f718f92721af3b95e74349a"},
    ),
    "cifar100": Named(
        "cifar",
        ("https://www.cs.toronto.edu/~kriz/",),
        {"cifar-100-python.tar.gz": "md5:eb9058c3a382ffc7106e4002c42a8d85"},
    ),
}
BUNDLED = "fashion-mnist-mini"  # the Fashion-MNIST test set inside the package: train = first 8,000, test = last 2,000
BUNDLED_TRAIN = 8000
DEBIAN_ROOT = Path("/usr/share/datasets")


def names() -> list[str]:
    return [BUNDLED, *NAMED]


def cache_dir() -> Path:
    if os.environ.get("IGPT_CACHE_DIR"):
        return Path(os.environ["IGPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "igpt"


# -- downloading --------------------------------------------------------------------------------------------
def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, checksum: str, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically; the file appears only once its checksum ("algo:hex") matches."""
    algo, _, want = checksum.partition(":")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.new(algo)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) only, see below
            total = getattr(resp, "length", None) or None  # http.client's parse: None, not a ValueError, for junk
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not sys.stderr.isatty()) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != want:
            raise IgptError(f"checksum mismatch for {url}: expected {algo} {want}, got {h.hexdigest()}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def _fetch(name: str, spec: Named, target: Path) -> None:
    """Download every file of a named data set into ``target`` (and unpack CIFAR archives)."""
    mirror = os.environ.get("IGPT_DATASET_MIRROR")
    bases = (mirror.rstrip("/") + "/" + name + "/",) if mirror else spec.urls
    for fname, checksum in spec.checksums.items():
        if (target / fname).is_file():
            if fname.endswith(".tar.gz"):
                _unpack(target / fname)  # an archive downloaded before a run died while unpacking it
            continue
        errors = []
        for base in bases:
            url = base + fname
            if not url.startswith(("http://", "https://")):
                raise IgptError(f"refusing to download from a non-HTTP URL: {url}")
            try:
                download(url, target / fname, checksum)
                break
            except urllib.error.HTTPError as e:
                errors.append(f"{url}: HTTP {e.code} {e.reason}")
            except http.client.HTTPException as e:  # not an HTTP answer (a mirror on another service's port: an
                # SSH banner is a BadStatusLine) or a body cut off mid-chunk; not an OSError, it was a traceback
                errors.append(f"{url}: not a valid HTTP response ({type(e).__name__}: {str(e).strip()[:80]!r})")
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                errors.append(f"{url}: {getattr(e, 'reason', e)}")
        else:
            raise IgptError(f"could not download {name} ({'; '.join(errors)}); put the files in "
                            f"--data-dir DIR/{name}/ or set IGPT_DATA_DIR")
        if fname.endswith(".tar.gz"):
            _unpack(target / fname)


def _plain_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Where tarfile has no ``filter="data"``: only regular files and folders under relative paths without
    '..' (what the data filter would keep of a data set archive); anything else is an IgptError."""
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if not (m.isfile() or m.isdir()) or Path(m.name).is_absolute() or ".." in parts:
            raise IgptError(f"{archive}: refusing archive member {m.name!r} (a link, device or path outside)")
    return members


def _unpacked_marker(archive: Path) -> Path:
    return archive.with_name(archive.name + ".unpacked")


def _forget_unpacked(d: Path, spec: Named) -> None:
    """Called when the unpacked files are missing (deleted by hand, say): the markers that said an archive was
    unpacked no longer hold, and left in place they made ``_unpack`` skip the archive for good."""
    for f in spec.checksums:
        if f.endswith(".tar.gz"):
            _unpacked_marker(d / f).unlink(missing_ok=True)


def _unpack(archive: Path) -> None:
    """Unpack a downloaded archive beside it, all or nothing: into a temporary folder, whose top-level entries
    then replace any (partial) earlier ones; the marker file, written last, says it is complete."""
    if _unpacked_marker(archive).is_file():
        return
    tmp = Path(tempfile.mkdtemp(dir=archive.parent, prefix=".unpack-"))
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tar.extractall(tmp, filter="data")  # refuses absolute paths, links out, devices
            else:
                tar.extractall(tmp, members=_plain_members(tar, archive))  # noqa: S202 - members checked
        for entry in tmp.iterdir():
            dest = archive.parent / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise IgptError(f"{archive}: not a readable archive ({e}); delete it to download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_bytes(_unpacked_marker(archive), b"")


# -- resolution ---------------------------------------------------------------------------------------------
def _has_files(d: Path, spec: Named) -> bool:
    if spec.kind == "idx":
        return all((d / f).is_file() or (d / f.removesuffix(".gz")).is_file() for f in IDX_FILES.values())
    return any((d / sub).is_dir() for sub in ("cifar-10-batches-py", "cifar-100-python")) or (
        (d / "data_batch_1").is_file() or (d / "train").is_file()
    )


def resolve(name: str, data_dir: str | Path | None = None) -> Path:
    """The folder that holds named data set ``name``, downloading it into the cache if needed."""
    spec = NAMED[name]
    explicit = data_dir or os.environ.get("IGPT_DATA_DIR")
    if explicit:
        d = Path(explicit) / name
        archives = [d / f for f in spec.checksums if f.endswith(".tar.gz") and (d / f).is_file()]
        if archives and not _has_files(d, spec):  # the archive as downloaded: check it, unpack it beside itself
            _forget_unpacked(d, spec)
            for a in archives:
                algo, _, want = spec.checksums[a.name].partition(":")
                if not _unpacked_marker(a).is_file() and file_digest(a, algo) != want:
                    raise IgptError(f"{a}: checksum mismatch ({algo} {want} expected): a damaged or other file")
                _unpack(a)
        if not _has_files(d, spec):
            want = ", ".join(spec.checksums) if spec.kind == "cifar" else ", ".join(IDX_FILES.values())
            raise IgptError(f"{d}: data set '{name}' not found there (expected {want})")
        return d
    if _has_files(DEBIAN_ROOT / name, spec):
        return DEBIAN_ROOT / name
    d = cache_dir() / "datasets" / name
    unpacked = all(_unpacked_marker(d / f).is_file() for f in spec.checksums if f.endswith(".tar.gz"))
    has = _has_files(d, spec)
    if not (has and unpacked):  # the cache is ours: only complete when every archive is
        if not has:
            _forget_unpacked(d, spec)
        _fetch(name, spec, d)
    return d


def _idx_path(d: Path, fname: str) -> Path:
    return d / fname if (d / fname).is_file() else d / fname.removesuffix(".gz")


def _idx_source(name: str, d: Path, classes: list[str] | None, bundled: bool = False) -> Source:
    f = {role: _idx_path(d, fname) for role, fname in IDX_FILES.items()}
    if bundled:
        imgs, labs = f["test_images"], f["test_labels"]
        splits = {"train": idx_split(imgs, labs, 0, BUNDLED_TRAIN), "test": idx_split(imgs, labs, BUNDLED_TRAIN)}
    else:
        splits = {"train": idx_split(f["train_images"], f["train_labels"]),
                  "test": idx_split(f["test_images"], f["test_labels"])}
    return Source(name, 1, splits, classes)


def open_source(data: str, data_dir: str | Path | None = None, channels: int | None = None,
                skip_bad: bool = False) -> Source:
    """``data`` is a named data set, a folder of images, a CIFAR batch folder or file, an IDX image file
    (labels are taken from the matching ``*labels*`` file beside it) or an ``.npz``/``.npy`` file."""
    if data == BUNDLED:
        with resources.as_file(resources.files("igpt") / "assets" / "fashion-mnist") as d:
            src = _idx_source(BUNDLED, Path(d), FASHION_CLASSES, bundled=True)
    elif data.startswith("openai-npy:"):  # igpt.prepare hands these to igpt.openai before calling us
        raise IgptError(f"--data {data}: OpenAI's arrays are palette ids, not images; only `igpt prepare` reads "
                        "them (into token shards)")
    elif data in NAMED:
        spec = NAMED[data]
        d = resolve(data, data_dir)
        if spec.kind == "idx":
            src = _idx_source(data, d, list(spec.class_names) if spec.class_names else None)
        else:
            src = cifar_source(d, data)
    else:
        src = _open_path(Path(data), channels, skip_bad)
    if channels is not None:
        if channels not in (1, 3):
            raise IgptError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
        src.channels = channels  # readers that don't convert by themselves are converted per chunk in prepare
    return src


def _open_path(p: Path, channels: int | None, skip_bad: bool) -> Source:
    if not p.exists():
        raise IgptError(f"--data {p}: no such file or folder, and not a named data set ({', '.join(names())})")
    if p.is_dir():
        if any((p / n).exists() for n in ("cifar-10-batches-py", "cifar-100-python", "data_batch_1", "test_batch")) or (
                (p / "train").is_file()):  # cifar-100-python/ itself (train, test, meta), as _has_files takes it
            return cifar_source(p)
        return folder_source(p, channels, skip_bad)
    if p.suffix in (".npz", ".npy"):
        return array_source(p, channels)
    if p.suffix.lower() in IMAGE_EXTS:
        raise IgptError(f"--data {p}: a single image; --data takes a folder of images (class subfolders optional)")
    if "idx" in p.name or "ubyte" in p.name:
        # escaped: a name with glob characters ('set[1]-images...') matched no labels file, or another one
        name = p.name.replace("images", "labels").replace("idx3", "idx1")
        other = name.removesuffix(".gz") if name.endswith(".gz") else name + ".gz"  # one of the two gunzipped
        labels = [f for n in (name, other) for f in sorted(p.parent.glob(glob.escape(n)))]
        lab = labels[0] if labels and labels[0] != p else None
        return Source(str(p), 1, {"train": idx_split(p, lab)}, None)
    with open(p, "rb") as f:
        if f.read(1) != b"\x80":  # every CIFAR batch is a protocol-2 pickle; this file is something else
            raise IgptError(f"--data {p}: not a source igpt reads (a named data set, an image folder, IDX files, a "
                            "CIFAR batch, .npz or .npy)")
    return cifar_source(p)  # a single batch file; the unpickler refuses anything else

