"""Reading token shards: ``load_shards`` opens a directory made by ``igpt prepare`` (images or OpenAI's arrays),
checks that its files agree with ``meta.json`` and its palette, and memory-maps the splits (``Shards``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt.errors import IgptError
from igpt.io import read_json
from igpt.palette import Palette, channel_name

FORMAT = "igpt-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class Shards:
    root: Path
    meta: dict
    palette: Palette

    @property
    def n_px(self) -> int:
        return self.meta["n_px"]

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.meta["counts"]]

    def tokens(self, split: str) -> np.ndarray:
        """Memory-mapped uint16 ids (N, n_px * n_px) of one split."""
        if split not in self.meta["counts"]:
            raise IgptError(f"{self.root}: no '{split}' split (has {', '.join(self.splits)})")
        return np.load(self.root / f"{split}_tokens.npy", mmap_mode="r", allow_pickle=False)

    def labels(self, split: str) -> np.ndarray | None:
        path = self.root / f"{split}_labels.npy"
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def pixels(self, split: str, native: bool = False) -> np.ndarray | None:
        """Memory-mapped uint8 images (N, side, side, C) of one split before quantization, at n_px or (native)
        at the source's own resolution (centre-cropped square); None when prepare did not keep them
        (--no-pixels, OpenAI's pre-quantized data, sources of mixed or small sizes for native)."""
        side = self.meta.get("native_px") if native else self.n_px
        path = self.root / f"{split}_{'native' if native else 'pixels'}.npy"
        if not side or not path.is_file():
            return None
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IgptError(f"{path}: unreadable ({e})") from None
        want = (self.meta["counts"][split], side, side, self.meta["channels"])
        if x.dtype != np.uint8 or x.shape != want:
            raise IgptError(f"{path}: {x.dtype} {x.shape}, meta.json says uint8 {want}")
        return x


def check_ids(ids: np.ndarray, palette_size: int) -> np.ndarray:
    """``ids`` (a batch read from a tokens file) unchanged, or IgptError if one is not a palette id: a damaged
    file, or ids of a larger palette (the model would read one as the start token, or index past its table)."""
    if ids.size and int(ids.max()) >= palette_size:
        raise IgptError(f"token id {int(ids.max())} in the shards is not a palette id (< {palette_size}): the "
                        "tokens file is damaged or was made with another palette")
    return ids


MAX_CLASSES = 1 << 20  # a classifier head (K, d) beyond this is a damaged label file, not a data set


def class_count(y: dict[str, np.ndarray], class_names: list | None, what: str) -> int:
    """The number of classes a probe or head is fitted for: the data's class names, else 1 + the largest
    label of train and val. Never from test: its labels would change the fit (an extra softmax row, and for two
    classes the penalty's scale) and so the choices made on val. A test label outside them is refused."""
    fitted = [int(y[s].max()) + 1 for s in ("train", "val") if len(y.get(s, ()))]
    k = max([len(class_names) if class_names else 0, *fitted])
    if k > MAX_CLASSES:
        raise IgptError(f"{what}: label {k - 1} in train/val: labels must be class indices 0 .. K-1 "
                        f"(K at most {MAX_CLASSES:,})")
    test = y.get("test")
    if test is not None and len(test) and int(test.max()) >= k:
        raise IgptError(f"{what}: test label {int(test.max())} is outside the {k} classes of train and val")
    return k


def check_two_classes(train_labels: np.ndarray, what: str, who: str) -> None:
    """IgptError unless the train labels hold at least two classes: with one, every prediction is that class
    (a 1-class softmax scored 100% on every split; sklearn refuses such data)."""
    present = np.unique(train_labels)
    if len(present) < 2:
        raise IgptError(f"{what}: {who} needs at least two classes in train; every train label is "
                        f"{int(present[0])}")


def load_shards(path: str | Path) -> Shards:
    """Open a shard directory made by ``prepare``, checking it is complete and consistent."""
    root = Path(path)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise IgptError(f"{root}: not a complete shard directory (no meta.json; run `igpt prepare`)")
    meta = read_json(meta_path)
    try:
        if meta.get("format") != FORMAT:
            raise IgptError(f"{meta_path}: not an igpt shard description (format {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:  # a later igpt's layout: refused, not misread
            raise IgptError(f"{meta_path}: shard format version {meta.get('version')!r}; this igpt reads version "
                            f"{FORMAT_VERSION} (prepare the shards again, or use the igpt that wrote them)")
        n_px, counts, palette_size = meta["n_px"], dict(meta["counts"]), meta["palette_size"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise IgptError(f"{meta_path}: malformed ({e})") from None
    # integers as prepare writes them: int() had let "8" or 8.0 through, and the loader, the model and sample
    # use meta.json's own value (a str n_px was a TypeError under --augment)
    sizes = {"n_px": n_px, "palette_size": palette_size, **{f"counts.{k}": v for k, v in counts.items()}}
    for key, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "n_px" else 0):
            raise IgptError(f"{meta_path}: malformed ({key} is {v!r}, not an integer >= "
                            f"{1 if key == 'n_px' else 0})")
    palette = Palette.load(root / "palette.npy")
    if palette.hash != meta.get("palette_sha256"):
        raise IgptError(f"{root}: palette.npy does not match the palette the shards were made with (meta.json)")
    if palette.k != palette_size:  # the model is sized by meta.json: its checkpoints could never be sampled
        raise IgptError(f"{root}: meta.json says a palette of {palette_size} colours, palette.npy has {palette.k}")
    if palette.channels != meta.get("channels"):
        raise IgptError(f"{root}: meta.json says {meta.get('channels')} channels, palette.npy has {palette.channels}")
    shards = Shards(root, meta, palette)
    for split, n in counts.items():
        try:
            t = shards.tokens(split)
        except (OSError, ValueError) as e:
            raise IgptError(f"{root / f'{split}_tokens.npy'}: unreadable ({e})") from None
        if t.dtype != np.uint16 or t.shape != (n, n_px * n_px):
            raise IgptError(f"{root / f'{split}_tokens.npy'}: {t.dtype} {t.shape}, meta.json says uint16 "
                            f"({n}, {n_px * n_px})")
        if meta.get("labels"):  # labelled shards: one integer label per image, readable in full
            path = root / f"{split}_labels.npy"
            try:
                y = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise IgptError(f"{path}: unreadable ({e})") from None
            if y.dtype.kind not in "iu" or y.shape != (n,) or (n and y.min() < 0):
                raise IgptError(f"{path}: {y.dtype} {y.shape}, expected integer labels >= 0, ({n},)")
    return shards


def describe(meta: dict) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in meta["counts"].items())
    return (f"{meta['source']}: {counts} images at {meta['n_px']}x{meta['n_px']}, "
            f"{channel_name(meta['channels'])}, palette of {meta['palette_size']} colours")
