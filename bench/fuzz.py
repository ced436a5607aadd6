"""Fuzz igpt's file readers with mutated real files and print JSON figures: cases tried per reader and their
outcomes (ok / IgptError / crash = any other exception / hang).

Usage: python bench/fuzz.py [--cases 2000] [--seed 0] [--timeout 10]

Each reader starts from a small valid file of its format (PNG, JPEG, IDX, gzipped IDX, CIFAR batch, .npy,
.npz, meta.json, palette .npy and preprocessor_config.json, model.safetensors, checkpoint config.json, a
training checkpoint's optimizer.pt, rng.pt and train_state.json) and
reads it after 1-4 mutations: bit flips, byte overwrites, truncation, deletion, duplication, and insertion of
bytes cut from the other seed files. tests/test_fuzz.py runs the same targets under Hypothesis.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Target:
    name: str
    file: Path  # the file the mutated bytes are written to
    seed: bytes  # its valid content
    read: Callable[[], object]  # reads it (and whatever around it) completely


def _drain(source) -> int:
    n = 0
    for split in source.splits.values():
        for imgs, _ in split.chunks(2):
            n += len(imgs)
    return n


def build_targets(root: Path) -> list[Target]:
    """Seed files under ``root`` (a fresh directory) and a reader for each."""
    from PIL import Image

    from igpt.checkpoint import load_model, save_model
    from igpt.cifar import cifar_source
    from igpt.data import array_source, idx_split, read_idx
    from igpt.images import decode_image
    from igpt.model import ImageGPT, ImageGPTConfig
    from igpt.palette import Palette
    from igpt.prepare import PrepareConfig, prepare
    from igpt.shards import load_shards

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    t: list[Target] = []

    def add(name: str, file: Path, read: Callable[[], object]) -> None:
        t.append(Target(name, file, file.read_bytes(), read))

    d = root / "img"
    d.mkdir()
    Image.fromarray(imgs[0]).save(d / "a.png")
    Image.fromarray(imgs[1][..., 0]).save(d / "g.png")
    Image.fromarray(imgs[2]).save(d / "a.jpg", quality=90)
    add("png_rgb", d / "a.png", lambda f=d / "a.png": decode_image(f))
    add("png_grey", d / "g.png", lambda f=d / "g.png": decode_image(f))
    add("jpeg", d / "a.jpg", lambda f=d / "a.jpg": decode_image(f))

    d = root / "idx"
    d.mkdir()
    head = bytes([0, 0, 8, 3]) + b"".join(int(x).to_bytes(4, "big") for x in (4, 8, 8))
    (d / "images.idx").write_bytes(head + imgs[..., 0].tobytes())
    (d / "labels.idx").write_bytes(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + bytes([0, 1, 2, 3]))
    (d / "images.idx.gz").write_bytes(gzip.compress(head + imgs[..., 0].tobytes(), mtime=0))

    def read_idx_pair(f, labels=d / "labels.idx"):
        read_idx(f)
        return sum(len(x) for x, _ in idx_split(f, labels).chunks(2))

    add("idx", d / "images.idx", lambda f=d / "images.idx": read_idx_pair(f))
    add("idx_gz", d / "images.idx.gz", lambda f=d / "images.idx.gz": read_idx_pair(f))
    add("idx_labels", d / "labels.idx", lambda f=d / "images.idx": read_idx_pair(f))

    d = root / "cifar"
    d.mkdir()
    big = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)  # CIFAR's size
    batch = {b"batch_label": b"b", b"labels": [0, 1], b"data": big.transpose(0, 3, 1, 2).reshape(2, -1).copy(),
             b"filenames": [b"a.png"] * 2}
    (d / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    add("cifar", d / "data_batch_1", lambda f=d / "data_batch_1": _drain(cifar_source(f)))

    d = root / "np"
    d.mkdir()
    np.save(d / "x.npy", imgs)
    np.savez(d / "x.npz", images=imgs, labels=np.arange(4))
    add("npy", d / "x.npy", lambda f=d / "x.npy": _drain(array_source(f)))
    add("npz", d / "x.npz", lambda f=d / "x.npz": _drain(array_source(f)))

    sh = root / "shards"
    prepare(PrepareConfig(out=str(sh), data=str(d / "x.npz"), n_px=4, palette_size=4))
    add("meta_json", sh / "meta.json", lambda: load_shards(sh))

    d = root / "pal"
    d.mkdir()
    pal = Palette(rng.uniform(-1, 1, size=(8, 3)).astype(np.float32))
    np.save(d / "palette.npy", pal.centers)  # no sidecar: the reader itself must cope
    (d / "preprocessor_config.json").write_text(json.dumps({"clusters": pal.centers.tolist()}))
    add("palette_npy", d / "palette.npy", lambda f=d / "palette.npy": Palette.load(f))
    add("palette_json", d / "preprocessor_config.json", lambda f=d / "preprocessor_config.json": Palette.load(f))

    import torch

    torch.manual_seed(0)
    ck = root / "ckpt"
    save_model(ck, ImageGPT(ImageGPTConfig(n_px=4, palette_size=8, n_embd=8, n_layer=1, n_head=2)), pal)
    add("safetensors", ck / "model.safetensors", lambda: load_model(ck))
    add("checkpoint_config", ck / "config.json", lambda: load_model(ck))

    from igpt.train_state import load_train_checkpoint, rng_state, save_train_checkpoint, set_rng_state

    model, _ = load_model(ck)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 16, dtype=torch.long)).sum().backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    ostate = opt.state_dict()
    ostate = {"state": {names[i]: v for i, v in ostate["state"].items()}, "param_groups": ostate["param_groups"]}
    tc = save_train_checkpoint(root / "run", model.state_dict(), model.config, pal, ostate, [rng_state()],
                               {"step": 1, "train_config": {}}, keep=1)
    def resume(cfg=model.config):  # what `--resume` does with the files, short of training
        state = load_train_checkpoint(tc, cfg)
        set_rng_state(state["rng"][0], str(tc / "rng.pt"))
        torch.optim.AdamW(model.parameters()).load_state_dict(
            {"state": {i: state["optim"]["state"][n] for i, n in enumerate(names)},
             "param_groups": state["optim"]["param_groups"]})

    for name, f in (("train_optimizer", "optimizer.pt"), ("train_rng", "rng.pt"), ("train_state", "train_state.json")):
        add(name, tc / f, resume)
    return t


OPS = ("flip", "set", "truncate", "delete", "duplicate", "insert")


def mutate(data: bytes, ops: list[tuple], pool: list[bytes]) -> bytes:
    """Apply (op, a, b, c) mutations; a, b, c are non-negative ints reduced modulo the sizes at hand."""
    b = bytearray(data)
    for op, a, x, y in ops:
        n = len(b)
        if op == "flip" and n:
            b[a % n] ^= 1 << (x % 8)
        elif op == "set" and n:
            b[a % n] = x % 256
        elif op == "truncate":
            del b[a % (n + 1):]
        elif op == "delete" and n:
            i = a % n
            del b[i : i + 1 + x % 64]
        elif op == "duplicate" and n:
            i = a % n
            b[i:i] = b[i : i + 1 + x % 64]
        elif op == "insert":
            src = pool[x % len(pool)]
            if src:
                j = y % len(src)
                b[a % (n + 1) : a % (n + 1)] = src[j : j + 1 + (x >> 8) % 256]
    return bytes(b)


class Hang(BaseException):  # not an Exception: decode_image turns every Exception into an IgptError
    pass


def classify(target: Target, data: bytes, timeout: float = 0) -> tuple[str, str]:
    """Write ``data`` to the target's file, read it; ('ok'|'igpt_error'|'crash'|'hang', detail). Restores the
    seed file afterwards."""
    from igpt.errors import IgptError

    target.file.write_bytes(data)
    if timeout:
        signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Hang()))
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        target.read()
        return "ok", ""
    except IgptError as e:
        return "igpt_error", str(e)
    except Hang:
        return "hang", ""
    except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
        return "crash", f"{type(e).__name__}: {e}"[:300]
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
        target.file.write_bytes(target.seed)


def campaign(cases: int, seed: int, timeout: float, only: list[str] | None = None) -> dict:
    rng = random.Random(seed)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        targets = build_targets(Path(tmp))
        pool = [t.seed for t in targets]
        for t in targets:
            if only and t.name not in only:
                continue
            counts = {"ok": 0, "igpt_error": 0, "crash": 0, "hang": 0}
            examples: dict[str, str] = {}
            t0 = time.perf_counter()
            for _ in range(cases):
                ops = [(rng.choice(OPS), rng.getrandbits(20), rng.getrandbits(16), rng.getrandbits(16))
                       for _ in range(rng.randint(1, 4))]
                kind, detail = classify(t, mutate(t.seed, ops, pool), timeout)
                counts[kind] += 1
                if kind in ("crash", "hang"):
                    examples.setdefault(detail.split(":")[0] or kind, detail)
            out[t.name] = {"cases": cases, **counts, "seconds": round(time.perf_counter() - t0, 1),
                           "crash_examples": examples}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=2000, help="mutated files per reader")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a read counts as a hang")
    p.add_argument("--only", nargs="*", help="readers to fuzz (default: all)")
    a = p.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    res = campaign(a.cases, a.seed, a.timeout, a.only)
    total = {k: sum(r[k] for r in res.values()) for k in ("cases", "ok", "igpt_error", "crash", "hang")}
    print(json.dumps({"total": total, "readers": res, "seed": a.seed, "wall_s": round(time.perf_counter() - t0, 1)},
                     indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
