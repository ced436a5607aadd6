"""OpenAI's original iGPT release (github.com/openai/image-gpt) -> igpt checkpoints and token shards.

Weights: ``import_openai`` reads a TF1 checkpoint (``igpt.tfcheckpoint``, no TensorFlow needed) whose
variables are named as openai/image-gpt src/model.py creates them, under the scope ``model``:

  model/wte (V, d)  model/wpe (n_ctx, d)  model/wtet (V, d)  model/sos (d,) [AR only]  model/ln_f/g (d,)
  model/h{i}/ln_1/g, ln_2/g (d,)
  model/h{i}/attn/{q,k,v}_proj (H, hd, d)   q[b,h,s,e] = sum_f x[b,s,f] w[h,e,f]
  model/h{i}/attn/c_proj (H, hd, d)        y[b,s,f] = sum_{h,e} a[b,h,s,e] w[h,e,f]
  model/h{i}/mlp/c_fc/w (d, 4d), mlp/c_proj/w (4d, d)   conv1d: y = x @ w
  model/clf/wclf (classes, d) [only when trained with --clf; kept as the "score" head]

Mapping onto ImageGPT (nn.Linear weights are (out, in)): wte gets the ``sos`` vector appended as row V
(SOS id = V; a zero row for BERT, which has no SOS); q/k/v reshape to (d, d) and stack into c_attn.weight
(head j owns rows j*hd..); c_proj reshapes to (d, d) and is transposed; the conv1d matrices are transposed;
``wtet`` is the untied head lm_head.weight; every bias is zero (the TF model has none). n_layer, n_embd,
n_head (from the per-head projection shapes), n_px and the palette size are all read off the tensors; a
checkpoint with ``sos`` is an AR (causal) model, one without a BERT (bidirectional) model. Only those names
are read; everything else (Adam slots ``.../Adam``, ``beta1_power``, ``global_step``, ...) is listed back.

Data: ``prepare_openai_npy`` turns OpenAI's pre-quantized ``trX/vaX/teX.npy`` (palette ids) and one-hot
``trY/vaY/teY.npy`` (as download.py names them: ``imagenet_trX.npy``, ...) into our token shards.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from igpt.checkpoint import build_model, save_model
from igpt.data import check_labels
from igpt.errors import IgptError
from igpt.model import ImageGPTConfig
from igpt.tfcheckpoint import TFCheckpoint

LAYER = re.compile(r"^model/h(\d+)/(ln_1/g|ln_2/g|attn/q_proj|attn/k_proj|attn/v_proj|attn/c_proj|mlp/c_fc/w|"
                   r"mlp/c_proj/w)$")
TOP = ("model/wte", "model/wpe", "model/wtet", "model/ln_f/g")
OPTIONAL = ("model/sos", "model/clf/wclf")
LAYER_PARTS = ("ln_1/g", "ln_2/g", "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/c_proj", "mlp/c_fc/w",
               "mlp/c_proj/w")
FLOATS = ("float32", "float16", "bfloat16")


@dataclass
class OpenAIImportConfig:
    checkpoint: str  # TF checkpoint prefix (model.ckpt-1000000), its .index file, or the folder holding it
    out: str  # igpt checkpoint directory to write (replaced atomically)
    palette: str | None = None  # kmeans_centers.npy (None: a checkpoint without a palette)
    bert: bool = False  # insist on a BERT checkpoint (one without `sos`); the mode is inferred either way
    preset: str | None = None  # check the inferred shape against a named preset (e.g. igpt-s)
    n_head: int | None = None  # check the inferred head count
    verify: bool = True  # CRC32C of every tensor read


def infer_config(ckpt: TFCheckpoint, source: str) -> ImageGPTConfig:
    """ImageGPTConfig from the tensors' shapes; IgptError naming any missing or misshapen tensor."""
    infos = ckpt.infos()
    missing = [n for n in TOP if n not in infos]
    if missing:
        raise IgptError(f"{source}: not an OpenAI iGPT checkpoint (missing {', '.join(missing)})")
    layers = sorted({int(m[1]) for n in infos if (m := LAYER.match(n))})
    if not layers or layers != list(range(len(layers))):
        raise IgptError(f"{source}: layers must be numbered h0..h{{L-1}}, found {layers or 'none'}")
    gone = [f"model/h{i}/{p}" for i in layers for p in LAYER_PARTS if f"model/h{i}/{p}" not in infos]
    if gone:
        raise IgptError(f"{source}: missing {', '.join(gone[:8])}{' ...' if len(gone) > 8 else ''}")
    for n, rank in (("model/wte", 2), ("model/wpe", 2), ("model/clf/wclf", 2)):
        if n in infos and len(infos[n].shape) != rank:
            raise IgptError(f"{source}: {n} has shape {infos[n].shape}, expected {rank} dimensions")
    (V, d), (n_ctx, _), q = infos["model/wte"].shape, infos["model/wpe"].shape, infos["model/h0/attn/q_proj"].shape
    if len(q) != 3 or q[0] * q[1] != d:
        raise IgptError(f"{source}: model/h0/attn/q_proj has shape {q}, expected (n_head, n_embd / n_head, {d})")
    n_px = math.isqrt(n_ctx)
    if n_px * n_px != n_ctx:
        raise IgptError(f"{source}: model/wpe has {n_ctx} positions, not a square image's pixel count")
    try:
        cfg = ImageGPTConfig(n_px=n_px, palette_size=V, n_embd=d, n_layer=len(layers), n_head=q[0],
                             mode="ar" if "model/sos" in infos else "bert")
    except IgptError as e:
        raise IgptError(f"{source}: {e}") from None
    want = expected_shapes(cfg)
    if "model/clf/wclf" in infos:
        want["model/clf/wclf"] = (infos["model/clf/wclf"].shape[0], d)
    bad = [f"{n} {infos[n].shape} != {s}" for n, s in want.items() if infos[n].shape != s]
    bad += [f"{n} is {infos[n].dtype}" for n in want if infos[n].dtype not in FLOATS]
    if bad:
        raise IgptError(f"{source}: inconsistent tensors: {', '.join(bad)}")
    return cfg


def expected_shapes(cfg: ImageGPTConfig) -> dict[str, tuple[int, ...]]:
    """OpenAI name -> shape for every weight a model of ``cfg`` reads."""
    V, d, H = cfg.palette_size, cfg.n_embd, cfg.n_head
    out = {"model/wte": (V, d), "model/wpe": (cfg.seq_len, d), "model/wtet": (V, d), "model/ln_f/g": (d,)}
    if cfg.causal:
        out["model/sos"] = (d,)
    for i in range(cfg.n_layer):
        p = f"model/h{i}/"
        out |= {p + "ln_1/g": (d,), p + "ln_2/g": (d,), p + "mlp/c_fc/w": (d, 4 * d), p + "mlp/c_proj/w": (4 * d, d)}
        out |= {p + f"attn/{n}": (H, d // H, d) for n in ("q_proj", "k_proj", "v_proj", "c_proj")}
    return out


def check_against(cfg: ImageGPTConfig, preset: str | None, n_head: int | None, bert: bool, source: str) -> None:
    """The inferred config must agree with what the user said (--preset, --n-head, --bert)."""
    if bert and cfg.causal:
        raise IgptError(f"{source}: --bert given, but the checkpoint has model/sos: it is an AR model")
    if n_head is not None and n_head != cfg.n_head:
        raise IgptError(f"{source}: --n-head {n_head}, but the attention weights have {cfg.n_head} heads")
    if preset is not None:
        from igpt.presets import get_preset

        p = get_preset(preset)
        bad = [f"{k} {getattr(cfg, k)} (preset {getattr(p, k)})" for k in
               ("n_px", "palette_size", "n_embd", "n_layer", "n_head") if getattr(cfg, k) != getattr(p, k)]
        if bad:
            raise IgptError(f"{source}: does not match preset {preset}: {', '.join(bad)}")


def openai_state(ckpt: TFCheckpoint, cfg: ImageGPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict from the TF tensors, reading one tensor at a time."""
    def get(name: str) -> torch.Tensor:
        return torch.from_numpy(ckpt.read(name).astype(np.float32, copy=False))

    d = cfg.n_embd
    sos = get("model/sos") if cfg.causal else torch.zeros(d)
    state = {"wte.weight": torch.cat([get("model/wte"), sos[None]]), "wpe.weight": get("model/wpe"),
             "ln_f.weight": get("model/ln_f/g"), "lm_head.weight": get("model/wtet")}
    for i in range(cfg.n_layer):
        p, h = f"model/h{i}/", f"h.{i}."
        qkv = [get(p + f"attn/{n}_proj").reshape(d, d) for n in "qkv"]  # (H, hd, d) -> (out = H*hd, in = d)
        state |= {
            h + "ln_1.weight": get(p + "ln_1/g"), h + "ln_2.weight": get(p + "ln_2/g"),
            h + "attn.c_attn.weight": torch.cat(qkv), h + "attn.c_attn.bias": torch.zeros(3 * d),
            h + "attn.c_proj.weight": get(p + "attn/c_proj").reshape(d, d).t().contiguous(),  # (in, out) -> (out, in)
            h + "attn.c_proj.bias": torch.zeros(d),
            h + "mlp.c_fc.weight": get(p + "mlp/c_fc/w").t().contiguous(), h + "mlp.c_fc.bias": torch.zeros(4 * d),
            h + "mlp.c_proj.weight": get(p + "mlp/c_proj/w").t().contiguous(), h + "mlp.c_proj.bias": torch.zeros(d),
        }
    return state


def unused_names(names: list[str]) -> list[str]:
    """Names the import does not read: optimizer slots, step counters, anything not an iGPT weight."""
    return [n for n in names if not (n in TOP or n in OPTIONAL or LAYER.match(n))]


def load_openai(cfg: OpenAIImportConfig):
    """-> (ImageGPT, Palette or None, heads, unused names)."""
    from igpt.palette import Palette

    ckpt = TFCheckpoint(cfg.checkpoint, verify=cfg.verify)
    source = str(ckpt.prefix)
    mcfg = infer_config(ckpt, source)
    check_against(mcfg, cfg.preset, cfg.n_head, cfg.bert, source)
    palette = None
    if cfg.palette is not None:  # before reading any weights: a wrong palette fails fast
        palette = Palette.load(cfg.palette)
        if palette.k != mcfg.palette_size:
            raise IgptError(f"{cfg.palette}: {palette.k} colours, but {source} has {mcfg.palette_size} (model/wte)")
    model = build_model(mcfg, openai_state(ckpt, mcfg), source)
    heads = {}
    if "model/clf/wclf" in ckpt:
        heads["score"] = torch.from_numpy(ckpt.read("model/clf/wclf").astype(np.float32, copy=False))
    return model, palette, heads, unused_names(ckpt.names())


def import_openai(cfg: OpenAIImportConfig) -> dict:
    """`igpt import-openai`: convert and save; returns a summary (what was found and what was left out)."""
    model, palette, heads, unused = load_openai(cfg)
    save_model(cfg.out, model, palette=palette, heads=heads or None)
    slots = [n for n in unused if re.search(r"/Adam(_\d+)?$", n)]
    return {"checkpoint": cfg.out, "config": model.config.to_dict(), "parameters": model.num_params(),
            "palette": None if palette is None else palette.k, "heads": sorted(heads),
            "optimizer_slots": len(slots), "unused": [n for n in unused if n not in slots]}


# -- OpenAI's pre-quantized data sets -----------------------------------------------------------------------
SPLIT_FILES = {"train": "trX", "val": "vaX", "test": "teX"}


def openai_npy_files(spec: str) -> dict[str, tuple[Path, Path | None]]:
    """``DIR`` (trX.npy ... or a single NAME_trX.npy ...) or a prefix ``DIR/NAME`` -> {split: (X, Y or None)}."""
    p = Path(spec)
    if p.is_dir():
        if (p / "trX.npy").is_file():
            stem = f"{p}/"
        else:
            found = sorted(f.name.removesuffix("trX.npy") for f in p.glob("*_trX.npy"))
            if len(found) != 1:
                raise IgptError(f"{p}: expected trX.npy or one NAME_trX.npy there, found {found or 'neither'}; "
                                "give the prefix, e.g. openai-npy:DIR/imagenet")
            stem = f"{p / found[0]}"
    else:
        stem = f"{p}_"
    files = {}
    for split, x in SPLIT_FILES.items():
        xf, yf = Path(f"{stem}{x}.npy"), Path(f"{stem}{x[:2]}Y.npy")
        if xf.is_file():
            files[split] = (xf, yf if yf.is_file() else None)
    if "train" not in files:
        raise IgptError(f"openai-npy:{spec}: no {stem}trX.npy")
    return files


def _load(f: Path) -> np.ndarray:
    from igpt.io import NPY_ERRORS, check_npy_file

    check_npy_file(f)  # the .npy magic (not a zip), a header that parses, sizes the file holds
    try:
        return np.load(f, mmap_mode="r", allow_pickle=False)
    except NPY_ERRORS as e:
        raise IgptError(f"{f}: not a readable .npy array ({e})") from None


LABEL_CHUNK = 1 << 14  # one-hot rows checked at a time


def _labels(f: Path, n: int) -> np.ndarray:
    y = _load(f)
    if y.ndim == 2:  # OpenAI's are one-hot (N, classes): checked in chunks (ImageNet's trY is 1.28M x 1000)
        out = np.empty(len(y), dtype=np.int64)
        for i in range(0, len(y), LABEL_CHUNK):
            c = np.asarray(y[i:i + LABEL_CHUNK])
            if not np.all((c == 0) | (c == 1)) or not np.all(c.sum(1) == 1):
                raise IgptError(f"{f}: a 2-D label array must be one-hot")
            out[i:i + len(c)] = c.argmax(1)
        y = out
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise IgptError(f"{f}: expected {n} integer labels or a one-hot ({n}, classes) array, got {y.dtype} {y.shape}")
    return check_labels(y, n, str(f))  # as every source's: shards hold int64 labels >= 0


def prepare_openai_npy(cfg) -> dict:
    """`igpt prepare --data openai-npy:DIR --palette kmeans_centers.npy --out SHARDS`: copy the palette ids into
    token shards (no decoding or quantizing: they are ids already). Without vaX, val is held out of train as
    for other sources. ``cfg`` is a PrepareConfig; n_px is taken from the arrays. Returns meta.json."""
    from igpt.io import atomic_dir
    from igpt.palette import Palette
    from igpt.prepare import OPENAI_NPY, TokenWriter, val_mask, write_meta
    from igpt.shards import SPLITS

    spec = cfg.data.removeprefix(OPENAI_NPY)
    if cfg.palette == "fit":
        raise IgptError("--data openai-npy: the arrays are palette ids already: give their palette, "
                        "--palette kmeans_centers.npy")
    palette = Palette.load(cfg.palette)
    if cfg.channels is not None:  # the ids' colours are the palette's: a --channels it contradicts was ignored
        palette.check_channels(cfg.channels, f"--channels {cfg.channels}")
    files = openai_npy_files(spec)
    xs = {s: _load(x) for s, (x, _) in files.items()}
    t = None
    for s, x in xs.items():
        if x.ndim not in (2, 3) or not np.issubdtype(x.dtype, np.integer):
            raise IgptError(f"{files[s][0]}: expected integer palette ids (N, n_px * n_px), got {x.dtype} {x.shape}")
        tx = math.prod(x.shape[1:])
        if t is not None and tx != t:
            raise IgptError(f"{files[s][0]}: {tx} tokens per image, but {files['train'][0].name} has {t}")
        t = tx
    n_px = math.isqrt(t)
    if n_px * n_px != t:
        raise IgptError(f"{files['train'][0]}: {t} tokens per image is not a square image")
    cfg = replace(cfg, n_px=n_px)
    labels = {s: _labels(y, len(xs[s])) if y is not None else None for s, (_, y) in files.items()}
    routes = {s: (s, np.ones(len(x), dtype=bool)) for s, x in xs.items()}
    n = len(xs["train"])
    held_test = np.zeros(n, dtype=bool)
    if "test" not in xs and cfg.test_fraction:  # as igpt.prepare does for every other source
        held_test = val_mask(n, cfg.test_fraction, cfg.seed + 1)
        if not held_test.any():
            raise IgptError(f"--test-fraction {cfg.test_fraction:g} of {n} training images holds out none")
        routes["test"] = ("train", held_test)
    routes["train"] = ("train", ~held_test)
    if "val" not in xs:
        is_val = np.zeros(n, dtype=bool)
        is_val[np.flatnonzero(~held_test)] = val_mask(int((~held_test).sum()), cfg.val_fraction, cfg.seed)
        routes["train"], routes["val"] = ("train", ~is_val & ~held_test), ("train", is_val)
    routes = {k: routes[k] for k in SPLITS if k in routes}
    counts = {o: int(m.sum()) for o, (_, m) in routes.items()}
    if not counts["train"]:  # as igpt.prepare refuses for every other source (exit 0 and train-less shards)
        raise IgptError(f"openai-npy:{spec}: no training images left after holding out val (--val-fraction "
                        f"{cfg.val_fraction}) and test (--test-fraction {cfg.test_fraction}) from {n} image(s)")
    with atomic_dir(cfg.out) as tmp:
        palette.save(tmp / "palette.npy")
        for o, (s, mask) in routes.items():
            w, rows = TokenWriter(tmp / f"{o}_tokens.npy", counts[o], t), np.flatnonzero(mask)
            for a in range(0, len(rows), cfg.chunk_size):
                ids = np.asarray(xs[s][rows[a:a + cfg.chunk_size]]).reshape(-1, t)
                if ids.size and (ids.min() < 0 or ids.max() >= palette.k):
                    raise IgptError(f"{files[s][0]}: ids outside 0..{palette.k - 1} (the palette has {palette.k})")
                w.write(ids)
            w.close()
            if labels[s] is not None:
                np.save(tmp / f"{o}_labels.npy", labels[s][mask], allow_pickle=False)
        has_labels = all(labels[s] is not None for s, _ in routes.values())
        return write_meta(tmp, cfg, palette, f"{OPENAI_NPY}{spec}", palette.channels, counts, has_labels)
