"""Hugging Face ``transformers`` ImageGPT checkpoints in and out (no ``transformers`` import needed).

Import reads a directory as ``save_pretrained`` writes it: ``config.json``, weights in ``model.safetensors``
or ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``; sharded ``*.index.json`` too) and the
palette from ``preprocessor_config.json`` (``clusters``). Accepted models:
  - ImageGPTForCausalImageModeling: ``transformer.*`` + ``lm_head.weight``;
  - ImageGPTModel (the base, keys without prefix, no ``lm_head``): imported with a ZERO output head, which
    is right for features / probes / fine-tuning; ``igpt sample`` refuses a model whose head is all zeros;
  - ImageGPTForImageClassification: its ``score.weight`` (num_labels, d) comes back beside the model and is
    saved in the checkpoint's heads.safetensors as "score" (it has no lm_head either: zero head as above).
The causal-mask buffers ``h.{i}.attn.bias`` / ``h.{i}.attn.masked_bias`` of old checkpoints are dropped;
any other unknown key, and any missing one, is an error that lists them.

Key mapping: HF's Conv1D stores weights as (in, out) (y = x @ W + b); ours are nn.Linear (out, in), so the
four projection matrices per block are transposed. Everything else maps by name (prefix ``transformer.``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from igpt.checkpoint import (
    build_model,
    load_heads,
    load_model,
    read_pt,
    read_tensors,
    save_model,
    write_safetensors,
)
from igpt.errors import IgptError
from igpt.io import atomic_dir, check_replaceable, chmod_default, read_json
from igpt.model import ImageGPT, ImageGPTConfig

CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # not attn.c_attn.bias / attn.c_proj.bias
HEAD_KEYS = {"lm_head.weight": None, "score.weight": "score"}
# transformers' ImageGPTConfig.attribute_map: a config.json may spell the sizes so, and transformers reads them
ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
           "num_hidden_layers": "n_layer"}


def hf_config_to_ours(hc: dict, source: str) -> ImageGPTConfig:
    """An HF ImageGPT config.json dict -> ImageGPTConfig; IgptError for variants our model does not compute."""
    if not isinstance(hc, dict):
        raise IgptError(f"{source}: expected a JSON object, got {type(hc).__name__}")
    if hc.get("model_type") != "imagegpt":
        raise IgptError(f"{source}: model_type is {hc.get('model_type')!r}, not 'imagegpt'")
    hc = dict(hc)
    for alias, key in ALIASES.items():  # as transformers reads them (ignored, the defaults were used instead)
        if alias in hc:
            if key in hc and hc[key] != hc[alias]:
                raise IgptError(f"{source}: {key}={hc[key]!r} contradicts {alias}={hc[alias]!r}")
            hc[key] = hc.pop(alias)
    need = {"activation_function": "quick_gelu", "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    bad = [f"{k}={hc[k]!r}" for k, v in need.items() if k in hc and hc[k] != v]
    n_embd = _count(hc, "n_embd", 512, source)  # the sizes feed arithmetic before ImageGPTConfig checks them
    if hc.get("n_inner") not in (None, 4 * n_embd):
        bad.append(f"n_inner={hc['n_inner']}")
    if bad:
        raise IgptError(f"{source}: unsupported ImageGPT variant ({', '.join(bad)})")
    n_pos, vocab = _count(hc, "n_positions", 1024, source), _count(hc, "vocab_size", 513, source)
    n_px = math.isqrt(n_pos)
    if n_px * n_px != n_pos:
        raise IgptError(f"{source}: n_positions {n_pos} is not a square image's pixel count")
    try:  # HF defaults for absent fields; dropout 0 (inference, and the paper trains without it)
        return ImageGPTConfig(n_px=n_px, palette_size=vocab - 1, n_embd=n_embd,
                              n_layer=hc.get("n_layer", 24), n_head=hc.get("n_head", 8),
                              norm_eps=hc.get("layer_norm_epsilon", 1e-5),
                              init_std=hc.get("initializer_range", 0.02))
    except IgptError as e:
        raise IgptError(f"{source}: {e}") from None


def _count(hc: dict, key: str, default: int, source: str) -> int:
    """Field ``key`` of an HF config (``default`` when absent), which must be a positive integer."""
    v = hc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise IgptError(f"{source}: {key} must be a positive integer, got {v!r}")
    return v


def our_config_to_hf(cfg: ImageGPTConfig) -> dict:
    return {
        "architectures": ["ImageGPTForCausalImageModeling"], "model_type": "imagegpt",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.seq_len, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "quick_gelu",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std, "scale_attn_weights": True,
        "use_cache": True, "tie_word_embeddings": False, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "dtype": "float32",
    }


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = hf_dir / index_name
        if index.is_file():
            files = _shard_files(index)
        elif (hf_dir / single).is_file():
            files = [single]
        else:
            continue
        state = {}
        for name in files:
            state.update(_read_one(hf_dir / name))
        return state
    raise IgptError(f"{hf_dir}: no model.safetensors or pytorch_model.bin (a save_pretrained directory?)")


def _shard_files(index: Path) -> list[str]:
    """The weight files a sharded checkpoint's index names (its weight_map: tensor name -> file name)."""
    try:
        d = json.loads(index.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise IgptError(f"{index}: not a readable shard index ({e})") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise IgptError(f"{index}: not a shard index (expected a weight_map of tensor names to file names)")
    outside = sorted(v for v in set(wm.values()) if Path(v).name != v or v in (".", ".."))
    if outside:  # the shards sit beside the index; a path would read files from elsewhere
        raise IgptError(f"{index}: shard names must be file names in its folder, got {', '.join(outside)}")
    return sorted(set(wm.values()))


def _read_one(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        return read_tensors(f)
    state = read_pt(f)  # weights_only: tensors and plain containers only, never arbitrary pickled objects
    if not isinstance(state, dict):
        raise IgptError(f"{f}: holds a {type(state).__name__}, not a state dict")
    bad = [repr(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
           or v.layout != torch.strided]  # sparse tensors (weights_only loads them) are not weights either
    if bad:
        raise IgptError(f"{f}: not a state dict of named tensors (entries {', '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''})")
    return state


def hf_state_to_ours(state: dict[str, torch.Tensor], source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """HF key names/layouts -> (our state dict without lm_head if absent, extra heads). Drops mask buffers."""
    ours, heads, unknown = {}, {}, []
    for k, v in state.items():
        name = k.removeprefix("transformer.")
        if MASK_BUFFER.match(name):
            continue
        if k in HEAD_KEYS:
            if HEAD_KEYS[k] is None:
                ours[k] = v
            else:
                heads[HEAD_KEYS[k]] = v
        elif name in ("wte.weight", "wpe.weight", "ln_f.weight") or name.startswith("h."):
            if CONV1D.match(name) and v.ndim != 2:  # (transposing it would fail before build_model's shape check)
                raise IgptError(f"{source}: {k} has shape {tuple(v.shape)}, expected a 2-D (in, out) Conv1D weight")
            ours[name] = v.t().contiguous() if CONV1D.match(name) else v
        else:
            unknown.append(k)
    if unknown:
        raise IgptError(f"{source}: unknown keys {sorted(unknown)}")
    return ours, heads


def load_hf(hf_dir: str | Path):
    """HF ImageGPT directory -> (ImageGPT, Palette or None, heads {name: tensor}, has_lm_head)."""
    from igpt.palette import Palette

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise IgptError(f"Hugging Face checkpoint directory not found: {hf_dir}")
    cfile = hf_dir / "config.json"
    hc = read_json(cfile)
    cfg = hf_config_to_ours(hc, str(cfile))
    ours, heads = hf_state_to_ours(_read_hf_weights(hf_dir), str(hf_dir))
    has_head = "lm_head.weight" in ours
    causal = has_head or "ImageGPTForCausalImageModeling" in (hc.get("architectures") or [])
    if hc.get("tie_word_embeddings") is True and causal:  # the head is wte itself: (vocab_size, d), SOS included
        raise IgptError(f"{cfile}: tie_word_embeddings is true: transformers' output head is then the token "
                        f"embedding, with {cfg.vocab_size} outputs (SOS included), not an untied head of "
                        f"{cfg.palette_size} as igpt's model has")
    if not has_head:  # base model or classifier: no generative head in the file
        ours["lm_head.weight"] = torch.zeros(cfg.palette_size, cfg.n_embd)  # (missing tensors: build_model says)
    ints = [f"{k} ({v.dtype})" for k, v in ours.items() if not v.is_floating_point()]
    if ints:  # weights are floats: .float() below would have turned damaged integer tensors into weights
        raise IgptError(f"{hf_dir}: weights that are not floating point: {', '.join(ints)}")
    model = build_model(cfg, {k: v.float() for k, v in ours.items()}, str(hf_dir))
    score = heads.get("score")
    if score is not None and (score.ndim != 2 or score.shape[1] != cfg.n_embd):
        raise IgptError(f"{hf_dir}: score.weight has shape {tuple(score.shape)}, expected (num_labels, {cfg.n_embd})")
    if score is not None and not score.is_floating_point():
        raise IgptError(f"{hf_dir}: score.weight is {score.dtype}, not floating point")
    palette = None
    pfile = hf_dir / "preprocessor_config.json"
    if pfile.is_file():
        try:
            pc = json.loads(pfile.read_text())
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise IgptError(f"{pfile}: not readable JSON ({e})") from None
        if not isinstance(pc, dict):
            raise IgptError(f"{pfile}: expected a JSON object, got {type(pc).__name__}")
        if pc.get("clusters") is not None:
            palette = Palette.load(pfile)  # (our grey palette, exported as RGB greys, comes back grey)
            if palette.k != cfg.palette_size:
                raise IgptError(f"{pfile}: {palette.k} clusters, but the model has {cfg.palette_size} colours")
    return model, palette, heads, has_head


def import_hf(hf_dir: str | Path, out_ckpt: str | Path) -> dict:
    """`igpt import-hf HF_DIR --out CKPT`: convert; returns a summary dict (what was found) for printing."""
    model, palette, heads, has_head = load_hf(hf_dir)
    save_model(out_ckpt, model, palette=palette, heads=heads or None)
    return {"checkpoint": str(out_ckpt), "config": model.config.to_dict(), "parameters": model.num_params(),
            "palette": None if palette is None else palette.k, "lm_head": has_head, "heads": sorted(heads),
            "note": None if has_head else "no lm_head in the file: the output head is zero (features only)"}


CLASSIFIER_INPUT = ("the exported ImageGPTForImageClassification gives igpt's fine-tuned logits when fed [SOS, x0 .. "
                    "x_{T-2}] (igpt.model.ar_inputs(pixels, palette_size); SOS = palette_size), as igpt finetune "
                    "pools them; fed the image processor's raw ids it pools other features")


def _is_our_export(d: dict) -> bool:
    """Whether config.json object ``d`` is one export_hf wrote: model_type imagegpt and only the keys it writes.
    (model_type alone also matched every save_pretrained / hub ImageGPT folder, which export-hf then deleted;
    those hold transformers_version and the like.)"""
    keys = set(our_config_to_hf(ImageGPTConfig())) | {"id2label", "label2id"}
    return d.get("model_type") == "imagegpt" and set(d) <= keys


def ours_to_hf_state(model: ImageGPT) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu", torch.float32)
        out[k if k == "lm_head.weight" else "transformer." + k] = v.t().contiguous() if CONV1D.match(k) else v.contiguous()
    return out


def export_hf(ckpt: str | Path, out_dir: str | Path) -> dict:
    """`igpt export-hf CKPT --out HF_DIR`: write a directory that
    ``transformers.ImageGPTForCausalImageModeling.from_pretrained`` loads (config.json, model.safetensors,
    and preprocessor_config.json with the palette as ``clusters`` when the checkpoint has one). A checkpoint
    with a ``score`` head (from ``igpt finetune`` or an imported classifier) also loads as
    ``ImageGPTForImageClassification``: its logits are the head on the mean of ln_f over all positions of the
    ids it is given. `igpt finetune` pools an AR model's pass over [SOS, x0 .. x_{T-2}] (the generative input,
    one forward pass for both losses), so the exported classifier gives the fine-tuned logits when fed
    ``ar_inputs(pixels, palette_size)``, not the image processor's raw ids (``CLASSIFIER_INPUT``)."""
    model, palette = load_model(ckpt)
    cfg = model.config
    if not cfg.causal:
        raise IgptError(f"{ckpt}: a BERT-mode model cannot be exported: transformers' ImageGPT is causal only")
    out_dir = Path(out_dir)
    check_replaceable(out_dir, {"config.json": _is_our_export})  # not an HF model folder igpt did not write
    heads = load_heads(ckpt)
    state, hc = ours_to_hf_state(model), our_config_to_hf(cfg)
    score = heads.pop("score", None)
    if score is not None and (score.ndim != 2 or score.shape[1] != cfg.n_embd):
        raise IgptError(f"{ckpt}: its score head has shape {tuple(score.shape)}, expected (classes, {cfg.n_embd})")
    if score is not None:  # a fine-tuned head: the same files also load as ImageGPTForImageClassification
        state["score.weight"] = score.detach().to("cpu", torch.float32).contiguous()
        hc["architectures"].append("ImageGPTForImageClassification")
        hc["id2label"] = {str(i): f"LABEL_{i}" for i in range(score.shape[0])}
        hc["label2id"] = {f"LABEL_{i}": i for i in range(score.shape[0])}
    with atomic_dir(out_dir) as tmp:
        write_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        chmod_default(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hc, indent=2) + "\n")
        if palette is not None:
            centers = np.asarray(palette.centers, dtype=np.float64)
            pc = {"image_processor_type": "ImageGPTImageProcessor", "do_resize": True, "resample": 2,
                  "size": {"height": cfg.n_px, "width": cfg.n_px}, "do_normalize": True,
                  "do_color_quantize": True}
            if centers.shape[1] == 1:  # HF's processor quantizes RGB: a grey palette becomes grey colours
                centers, pc["igpt_channels"] = np.repeat(centers, 3, axis=1), 1
            pc["clusters"] = centers.tolist()
            pc["igpt_dtype"] = palette.centers.dtype.name  # JSON has float64 only; Palette.load restores it
            (tmp / "preprocessor_config.json").write_text(json.dumps(pc, indent=2) + "\n")
    return {"hf_dir": str(out_dir), "palette": None if palette is None else palette.k,
            "classifier": score is not None, "dropped_heads": sorted(heads),
            "note": CLASSIFIER_INPUT if score is not None else None}
