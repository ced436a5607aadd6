"""`igpt <command>`: each command parses its flags, builds a typed config and calls one library function.

User errors (``IgptError``) print one line, ``igpt: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from igpt import __version__
from igpt.errors import IgptError

DISTRIBUTED = ("train", "eval")  # the commands that share their work over torchrun's ranks; the others refuse
MODEL_FLAGS = ("n_layer", "n_embd", "n_head", "n_px", "palette_size")  # `igpt train` flags over the preset
CONFIG_HELP = ("settings from a .json or .toml file ({fields} field names, or the JSON a run of this command "
               "wrote); flags given here override them, the config's defaults fill the rest")
DATA_HELP = ("a named data set ({names}), an image folder (root/<class>/*.png or flat), a CIFAR batch folder "
             "or file, an IDX image file, an .npz/.npy array file, or openai-npy:DIR for OpenAI's "
             "pre-quantized trX/vaX/teX.npy (palette ids already; give --palette kmeans_centers.npy)")


def cmd_prepare(args: argparse.Namespace) -> int:
    from igpt.prepare import PrepareConfig, prepare
    from igpt.shards import describe

    def palette_file_over_config(d: dict, given: dict) -> None:
        # a palette file named by flag has its own size: a --config file's palette_size (the meta.json of a run
        # that fitted its palette) no longer applies, rather than contradicting the file
        if given.get("palette", "fit") != "fit" and "palette_size" not in given:
            d.pop("palette_size", None)

    cfg = _settings(args, PrepareConfig, "config", "prepare", required=("out",), adjust=palette_file_over_config)
    meta = prepare(cfg)
    print(describe(meta))
    if meta["palette_fit"]:
        f = meta["palette_fit"]
        print(f"palette: k-means on {f['pixels']:,} pixels ({f['distinct_colours']:,} distinct colours), "
              f"{f['iterations']} iterations, inertia {f['inertia']:.4g}")
    if meta["skipped"]:
        print(f"skipped {len(meta['skipped'])} unreadable file(s), listed in meta.json")
    print(f"wrote {cfg.out}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from igpt.datasets import BUNDLED, NAMED

    mirror = os.environ.get("IGPT_DATASET_MIRROR")  # replaces the canonical URLs (datasets._fetch)
    print(f"{BUNDLED:15s} bundled: the Fashion-MNIST test set (train = first 8,000, test = last 2,000), 28x28 grey")
    for name, spec in NAMED.items():
        where = f"{mirror.rstrip('/')}/{name}/ ($IGPT_DATASET_MIRROR)" if mirror else spec.urls[0]
        print(f"{name:15s} {spec.kind}, from --data-dir / $IGPT_DATA_DIR, /usr/share/datasets/{name}, "
              f"or downloaded from {where}")
    return 0


def _print_import(source: str, info: dict, kind: str, no_palette: str) -> None:
    c = info["config"]
    print(f"imported {source}: {kind}{c['n_layer']} layers, {c['n_embd']} wide, {c['n_head']} heads, "
          f"{c['n_px']}x{c['n_px']}, {info['parameters']:,} parameters, palette {info['palette'] or no_palette}")
    if info["heads"]:
        print(f"extra heads kept: {', '.join(info['heads'])}")


def cmd_import_hf(args: argparse.Namespace) -> int:
    from igpt.hf import import_hf

    info = import_hf(args.hf_dir, args.out)
    _print_import(args.hf_dir, info, "", "none (no preprocessor_config.json)")
    if info["note"]:
        print(f"note: {info['note']}")
    print(f"wrote {args.out}")
    return 0


def cmd_import_openai(args: argparse.Namespace) -> int:
    from igpt.openai import OpenAIImportConfig, import_openai

    info = import_openai(OpenAIImportConfig(checkpoint=args.prefix, out=args.out, palette=args.palette,
                                            bert=args.bert, preset=args.preset, n_head=args.n_head,
                                            verify=not args.no_verify))
    _print_import(args.prefix, info, f"{info['config']['mode'].upper()} model, ", "none (no --palette)")
    if info["optimizer_slots"] or info["unused"]:
        names = info["unused"][:10] + (["..."] if len(info["unused"]) > 10 else [])
        print(f"not imported: {info['optimizer_slots']} optimizer slot(s) and {len(info['unused'])} other "
              f"tensor(s){': ' + ', '.join(names) if names else ''}")
    print(f"wrote {args.out}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from igpt.hf import export_hf

    info = export_hf(args.checkpoint, args.out)
    if info["dropped_heads"]:
        print(f"note: heads with no place in the Hugging Face classes were not exported: {', '.join(info['dropped_heads'])}")
    also = " and ImageGPTForImageClassification" if info["classifier"] else ""
    print(f"wrote {args.out} (transformers.ImageGPTForCausalImageModeling{also}.from_pretrained loads it)")
    if info["note"]:
        print(f"note: {info['note']}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from igpt.sample import sample_to_grid

    ids = sample_to_grid(args.checkpoint, args.n, args.out, complete_from=args.complete_from, rows=args.rows,
                         seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         tokens_out=args.tokens_out, per_image=args.per_image, device=args.device,
                         cuda_graph=args.cuda_graph)
    print(f"sampled {len(ids)} image(s); wrote {args.out}" + (f" and {args.tokens_out}" if args.tokens_out else ""))
    return 0


def _given(args: argparse.Namespace) -> dict:
    """The settings set by flags on the command line: the commands with --config give their flags no argparse
    defaults, so every flag left out is None and the config dataclass's own default applies."""
    return {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "func", "config")}


def _settings(args: argparse.Namespace, cls, section: str, what: str, required: tuple[str, ...], adjust=None):
    """``cls`` built from the --config file (if any) with the flags set on the command line over it;
    ``adjust(merged, given)`` may then drop file settings that a flag makes moot."""
    from igpt.settings import build, merged

    given = _given(args)
    d = merged(args.config, section, given, what)
    if adjust is not None:
        adjust(d, given)
    missing = [k for k in required if k not in d]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise IgptError(f"{what}: {flags} required (on the command line or in the --config file)")
    return build(cls, d, what)


def cmd_train(args: argparse.Namespace) -> int:
    from igpt.train import train
    from igpt.train_config import TrainConfig

    overrides = {k: v for k in MODEL_FLAGS if (v := vars(args).pop(k)) is not None}
    if overrides:  # over the --config file's model_overrides, key by key
        args.model_overrides = overrides
    cfg = _settings(args, TrainConfig, "train", "train", required=("data",))
    res = train(cfg)
    from igpt.distributed import print0

    if res["losses"]:
        last = max(res["losses"])
        print0(f"step {last}: loss {res['losses'][last]:.4f} nats/token; wrote {cfg.out}")
    else:
        print0(f"nothing to do: {cfg.out} is already at step {res['step']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from igpt.evaluate import EvalConfig, evaluate

    cfg = _settings(args, EvalConfig, "config", "eval", required=("checkpoint", "data"))
    res = evaluate(cfg)
    from igpt.distributed import print0  # under torchrun: rank 0 prints (every rank has the result)

    print0(json.dumps(res, indent=2))  # the interface: JSON on stdout (as in the file, plus "out")
    print0(f"{res['split']}: {res['nats_per_token']:.5f} nats/token = {res['bits_per_token']:.5f} bits/token over "
          f"{res['tokens_scored']} tokens of {res['images_scored']} images ({res['tokens']}); wrote {res['out']}",
          file=sys.stderr)
    return 0


def _number_list(flag: str, text: str | None, kind: type, what: str) -> tuple:
    """'a,b,c' -> (kind(a), kind(b), kind(c)); '' -> ()."""
    if not text:
        return ()
    try:
        return tuple(kind(s) for s in text.split(","))
    except ValueError:
        raise IgptError(f"{flag} must be comma-separated {what}, got {text!r}") from None


def cmd_probe(args: argparse.Namespace) -> int:
    from igpt.probe import ProbeConfig, run_probe

    cs = vars(args).pop("cs")  # the two list flags, as the config's tuples
    if cs is not None:
        args.Cs = _number_list("--cs", cs, float, "numbers")
    if args.labels_per_class is not None:
        args.labels_per_class = _number_list("--labels-per-class", args.labels_per_class, int, "integers")
    cfg = _settings(args, ProbeConfig, "config", "probe", required=("checkpoint", "data", "out"))
    res = run_probe(cfg)
    print(f"best layer {res['best_layer']} (C {res['C']:g}, on val): val {100 * res['val_accuracy']:.2f}%, "
          f"test {100 * res['test_accuracy']:.2f}%; raw pixels test {100 * res['baseline_test_accuracy']:.2f}%")
    if "native_px" in res:
        print(f"raw pixels at the source's {res['native_px']}x{res['native_px']}: test "
              f"{100 * res['baseline_native_test_accuracy']:.2f}%")
    if "concat" in res:
        c = res["concat"]
        print(f"layers {c['layers']} concatenated: test {100 * c['test_accuracy']:.2f}%")
    for w in res["warnings"]:
        print(f"warning: {w}")
    for r in res.get("low_data", []):
        print(f"{r['labels_per_class']} labels/class: {100 * r['mean']:.2f} +- {100 * r['std']:.2f}% "
              f"(raw pixels {100 * r['baseline_mean']:.2f} +- {100 * r['baseline_std']:.2f}%"
              + (f"; at {res['native_px']}x{res['native_px']} {100 * r['baseline_native_mean']:.2f} +- "
                 f"{100 * r['baseline_native_std']:.2f}%" if "native_px" in res else "") + ")")
    print(f"wrote {cfg.out}/probe.json and {cfg.out}/probe.png")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from igpt.finetune import FinetuneConfig, finetune

    cfg = _settings(args, FinetuneConfig, "config", "finetune", required=("checkpoint", "data", "out"))
    res = finetune(cfg)
    stop = f", stopped early after step {res['steps_run']}" if res["stopped_early"] else ""
    print(f"best val step {res['best_step']}{stop}: val {100 * res['val_accuracy']:.2f}%, "
          f"test {100 * res['test_accuracy']:.2f}%")
    print(f"wrote {cfg.out}/finetune.json and {res['out_checkpoint']}")
    return 0


LABELLED = "labelled token shards with train, val and test splits"


def cmd_demo(args: argparse.Namespace) -> int:
    from igpt.demo import DemoConfig, run_demo

    run_demo(_settings(args, DemoConfig, "config", "demo", required=()))
    return 0


def _data_source_args(p: argparse.ArgumentParser, default: str | None = "fashion-mnist-mini") -> None:
    from igpt.datasets import names

    p.add_argument("--data", default=default, help=DATA_HELP.format(names=", ".join(names()))
                   + " (default fashion-mnist-mini)")
    p.add_argument("--data-dir", help="folder holding named data sets as DIR/<name>/ (default $IGPT_DATA_DIR)")


def _model_and_shards(p: argparse.ArgumentParser, checkpoint_help: str, data_help: str,
                      required: bool = True) -> None:
    """The flags every command that runs a checkpoint on token shards takes (``required`` False: they may come
    from a --config file instead)."""
    also = "" if required else " (required, here or in --config)"
    p.add_argument("--checkpoint", required=required, help=checkpoint_help + also)
    p.add_argument("--data", required=required, help=data_help + also)
    p.add_argument("--device", help="torch device (default: cuda when present, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="igpt", description="Image GPT: generative pretraining from pixels.")
    p.add_argument("--version", action="version", version=f"igpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "prepare", help="images -> palette ids: token shards for training and evaluation",
        description="Decode images, centre-crop non-square ones, resize to N x N (box filter when shrinking), "
                    "fit or load a colour palette, and write token shards (uint16 .npy), labels, the palette "
                    "and meta.json into OUT, atomically.")
    q.add_argument("--config", help=CONFIG_HELP.format(fields="PrepareConfig"))
    _data_source_args(q, default=None)
    q.add_argument("--n-px", type=int, help="image side in pixels (default 32, as the paper)")
    q.add_argument("--palette", help="'fit' (k-means on the training pixels) or a palette file: "
                   "palette.npy, OpenAI's kmeans_centers.npy or a Hugging Face preprocessor_config.json "
                   "(default fit)")
    q.add_argument("--palette-size", type=int, help="colours for --palette fit (default 512 RGB, 16 grey)")
    q.add_argument("--channels", type=int, choices=(1, 3), help="force grey (1) or RGB (3)")
    q.add_argument("--val-fraction", type=float, help="share of train held out (default 0.1)")
    q.add_argument("--test-fraction", type=float,
                   help="share of train held out as a test split when the source has none (default 0)")
    q.add_argument("--seed", type=int, help="seed of the validation split and palette fit (default 0)")
    q.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, default=None,
                   help="skip unreadable image files, counting them (default off)")
    q.add_argument("--no-pixels", dest="pixels", action="store_false", default=None,
                   help="do not keep {split}_pixels.npy (the images before quantization, for the probe's "
                        "raw-pixel baseline; the baseline then uses the palette colours)")
    q.add_argument("--chunk-size", type=int, help="images per chunk, bounds memory (default 2048)")
    q.add_argument("--fit-pixels", type=int, help="pixels sampled for the palette fit (default 1000000)")
    q.add_argument("--out", help="output directory, replaced atomically (required, here or in --config)")
    q.set_defaults(func=cmd_prepare)

    h = sub.add_parser("import-hf", help="convert a Hugging Face ImageGPT checkpoint into an igpt checkpoint",
                       description="Read a transformers ImageGPT directory (config.json + model.safetensors or "
                                   "pytorch_model.bin, loaded with weights_only=True; preprocessor_config.json "
                                   "for the palette) and write an igpt checkpoint directory.")
    h.add_argument("hf_dir", help="directory as save_pretrained writes it")
    h.add_argument("--out", required=True, help="checkpoint directory to write")
    h.set_defaults(func=cmd_import_hf)

    o = sub.add_parser("import-openai", help="convert an original OpenAI iGPT TensorFlow checkpoint",
                       description="Read a TensorFlow V2 checkpoint of openai/image-gpt (PREFIX.index + "
                                   "PREFIX.data-*; no TensorFlow needed) and write an igpt checkpoint directory. "
                                   "The shape and mode are read off the tensors: with model/sos an AR model, "
                                   "without it a BERT model. Optimizer slots and counters are listed, not read.")
    o.add_argument("prefix", help="checkpoint prefix, e.g. model.ckpt-1000000 (or its .index file)")
    o.add_argument("--palette", help="OpenAI's kmeans_centers.npy (or any palette file) stored with the model")
    o.add_argument("--out", required=True, help="checkpoint directory to write")
    o.add_argument("--bert", action="store_true", help="require a BERT checkpoint (one without model/sos)")
    o.add_argument("--preset", help="check the inferred shape against a preset, e.g. igpt-s")
    o.add_argument("--n-head", type=int, help="check the inferred number of attention heads")
    o.add_argument("--no-verify", action="store_true", help="skip the CRC32C check of each tensor")
    o.set_defaults(func=cmd_import_openai)

    e = sub.add_parser("export-hf", help="write an igpt checkpoint in the Hugging Face ImageGPT format",
                       description="Write config.json, model.safetensors and preprocessor_config.json (the "
                                   "palette as clusters) so ImageGPTForCausalImageModeling.from_pretrained loads it.")
    e.add_argument("checkpoint", help="igpt checkpoint directory")
    e.add_argument("--out", required=True, help="directory to write")
    e.set_defaults(func=cmd_export_hf)

    s = sub.add_parser("sample", help="sample images or complete test images from their top rows",
                       description="KV-cached sampling into a PNG grid. With --complete-from, each source image "
                                   "keeps its top --rows rows and gets --per-image completions; grid rows are "
                                   "original | top rows | completions.")
    s.add_argument("--checkpoint", required=True, help="igpt checkpoint directory")
    s.add_argument("--n", type=int, default=16, help="images to generate in all (default 16)")
    s.add_argument("--out", required=True, help="PNG grid to write")
    s.add_argument("--complete-from", help="token shards whose test (else val) images are completed")
    s.add_argument("--rows", type=int, help="rows kept from each source image (default n_px / 2)")
    s.add_argument("--per-image", type=int, default=4, help="completions per source image (default 4)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same images (default 0)")
    s.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    s.add_argument("--top-k", type=int, help="keep the k most likely colours and any tied with the k-th (--top-k 1 is "
                   "greedy)")
    s.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with probability >= p")
    s.add_argument("--tokens-out", help="also save the generated palette ids, (N, n_px^2), as .npy")
    s.add_argument("--device", help="torch device (default: CUDA when present, else CPU)")
    s.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only: replay each decode step as one CUDA graph (3.5x faster at batch 8 on an H100)")
    s.set_defaults(func=cmd_sample)

    t = sub.add_parser(
        "train", help="pretrain on token shards (AR or BERT); one process or many under torchrun",
        description="The paper's recipe: AdamW betas (0.9, 0.95), linear warm-up then cosine decay to 0, no "
                    "weight decay or dropout, gradient clipping. --batch-size is the global batch, split over "
                    "ranks (torchrun) and micro-batches. OUT gets config.json, metrics.jsonl, loss.png and "
                    "checkpoints/ (step-NNNNNN directories and a 'latest' pointer).")
    t.add_argument("--config", help=CONFIG_HELP.format(fields="TrainConfig"))
    t.add_argument("--data", help="token shards from `igpt prepare` (required, here or in --config)")
    t.add_argument("--preset", help="model size: tiny, cpu-small, cpu-base, igpt-s, igpt-m, igpt-l, igpt-xl (default cpu-small)")
    t.add_argument("--objective", choices=("ar", "bert"), help="next pixel (ar) or masked pixel (default ar)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    t.add_argument("--batch-size", type=int, help="global batch in images (default 64)")
    t.add_argument("--micro-batch-size", type=int, help="images per forward pass per rank (default: all)")
    t.add_argument("--out", help="run directory (default runs/igpt)")
    t.add_argument("--resume", help="'auto': continue the newest checkpoint in OUT, if any; or a checkpoint dir")
    t.add_argument("--seed", type=int, help="init, data order, masks, augmentation (default 0)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    t.add_argument("--warmup", type=int, help="linear warm-up steps (default 100)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0, as the paper)")
    t.add_argument("--dropout", type=float, help="dropout (default 0, as the paper)")
    t.add_argument("--grad-clip", type=float, help="max gradient norm; 0 = off (default 1)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None, help="random crop (reflect pad) + horizontal flip")
    t.add_argument("--dtype", choices=("auto", "fp32", "bf16"),
                   help="autocast dtype; auto = bf16 on CUDA and CPUs with native bf16, else fp32")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile each block")
    t.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None, help="recompute blocks in backward")
    t.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None, help="shard with FSDP2 instead of DDP under torchrun")
    t.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    t.add_argument("--log-every", type=int, help="steps between metrics rows (default 10)")
    t.add_argument("--eval-every", type=int, help="steps between validations; 0 = at the end (default 500)")
    t.add_argument("--eval-images", type=int, help="val images per validation; 0 = all (default 1000)")
    t.add_argument("--save-every", type=int, help="steps between checkpoints (default 500)")
    t.add_argument("--keep", type=int, help="checkpoints kept (default 3)")
    t.add_argument("--stop-at", type=int, help="stop after this step (checkpointing) as if interrupted")
    t.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop (checkpointing) once the loop has run this long; the schedule stays that of --steps")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    for name in MODEL_FLAGS:
        t.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the preset's {name}")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("eval", help="test-set negative log-likelihood in nats and bits per token",
                       description="Score a checkpoint on token shards: AR models on every pixel (the first "
                                   "from SOS), BERT models on the pixels of a fixed seeded mask. Prints and "
                                   "writes JSON with nats_per_token and bits_per_token. Under torchrun the ranks "
                                   "share the batches.")
    v.add_argument("--config", help=CONFIG_HELP.format(fields="EvalConfig"))
    _model_and_shards(v, "igpt checkpoint directory", "token shards from `igpt prepare`", required=False)
    v.add_argument("--split", help="split to score (default test)")
    v.add_argument("--out", help="JSON file to write (default CHECKPOINT/eval.json)")
    v.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    v.add_argument("--max-images", type=int, help="score only the first N images (default 0: all)")
    v.add_argument("--mask-prob", dest="bert_mask_prob", type=float,
                   help="BERT: masking probability (default 0.15)")
    v.add_argument("--seed", type=int, help="BERT: seed of the fixed mask (default 0)")
    v.set_defaults(func=cmd_eval)

    r = sub.add_parser("probe", help="per-layer linear probes, raw-pixel baseline, low-data protocol",
                       description="Pooled features of each layer, L2 logistic regression (torch L-BFGS), the "
                                   "layer and strength chosen on val, refit on train+val, test accuracy; the same "
                                   "on raw pixels. Writes OUT/probe.json and OUT/probe.png.")
    r.add_argument("--config", help=CONFIG_HELP.format(fields="ProbeConfig"))
    _model_and_shards(r, "igpt checkpoint directory", LABELLED, required=False)
    r.add_argument("--out", help="output directory (required, here or in --config)")
    r.add_argument("--layers", help="'all' or comma-separated layers, e.g. 2,4,6 (default all)")
    r.add_argument("--concat", type=int, help="also probe layers best-K..best+K concatenated (default 0: no)")
    r.add_argument("--labels-per-class", help="low-data protocol: comma-separated K, e.g. 4,25,400")
    r.add_argument("--seeds", type=int, help="low-data draws per K (default 5)")
    r.add_argument("--cs", help="comma-separated C grid (sklearn's C; default 1e-3,1e-2,1e-1,1,10)")
    r.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    r.add_argument("--max-iter", type=int, help="L-BFGS iterations per fit (default 1000)")
    r.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None, help="keep features in OUT/features/*.npy and reuse them")
    r.set_defaults(func=cmd_probe)

    f = sub.add_parser("finetune", help="fine-tune with a linear classification head (L_clf + lambda * L_gen)",
                       description="Joint fine-tuning: a bias-free linear head on the mean-pooled final normalised "
                                   "features, loss L_clf + lambda * L_gen, AdamW (0.9, 0.95) at a constant lr, "
                                   "early stopping on val accuracy, test accuracy at the best val step. Writes "
                                   "OUT/finetune.json and OUT/checkpoint (the head in heads.safetensors as 'score').")
    f.add_argument("--config", help=CONFIG_HELP.format(fields="FinetuneConfig"))
    _model_and_shards(f, "pretrained igpt checkpoint directory", LABELLED, required=False)
    f.add_argument("--out", help="output directory (required, here or in --config)")
    f.add_argument("--lambda-gen", type=float, help="weight of the generative loss (default 1; 0 = "
                   "classification only)")
    f.add_argument("--lr", type=float, help="constant learning rate (default 3e-4)")
    f.add_argument("--steps", type=int, help="optimizer steps at most (default 1000)")
    f.add_argument("--batch-size", type=int, help="images per step (default 64)")
    f.add_argument("--eval-every", type=int, help="steps between validations (default 100)")
    f.add_argument("--patience", type=int, help="validations without a new best before stopping "
                   "(default 0: never stop early)")
    f.add_argument("--mask-ensemble", type=int, help="BERT: average predictions over K random masks "
                   "(default 1; the paper uses 5)")
    f.add_argument("--seed", type=int, help="batch order and masks (default 0)")
    f.set_defaults(func=cmd_finetune)

    m = sub.add_parser(
        "demo", help="the whole pipeline on one data set in minutes: prepare, train, eval, probe, sample, report",
        description="Prepare token shards, pretrain a small AR model sized to a time budget, measure val/test "
                    "NLL, run the per-layer linear probe beside the raw-pixel baseline, complete test images "
                    "from their top half, draw samples, and write OUT/report.html and OUT/summary.json.")
    m.add_argument("--config", help=CONFIG_HELP.format(fields="DemoConfig"))
    _data_source_args(m, default=None)
    m.add_argument("--out", help="output directory (an old demo there is replaced; default runs/demo)")
    m.add_argument("--minutes", type=float, help="wall-time budget of the whole run (default 9)")
    m.add_argument("--steps", type=int, help="training steps (default: as many as the budget buys)")
    m.add_argument("--stop-at", type=int, help="with --steps: stop training at this step, on the schedule of "
                   "--steps (the report's command uses it where the time limit stopped the loop)")
    m.add_argument("--n-px", type=int, help="image side in pixels (default 12)")
    m.add_argument("--palette-size", type=int, help="colours (default 16 grey, 64 RGB)")
    m.add_argument("--preset", help="model size (default cpu-small)")
    m.add_argument("--batch-size", type=int, help="images per training step (default 16)")
    m.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    m.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="random crop + horizontal flip during pretraining (default on)")
    m.add_argument("--completions", type=int, help="test images completed from their top half (default 8)")
    m.add_argument("--per-image", type=int, help="completions per test image (default 4)")
    m.add_argument("--samples", type=int, help="unconditional samples (default 16)")
    m.add_argument("--seed", type=int, help="splits, palette, model and sampling seed (default 0)")
    m.add_argument("--device", help="torch device (default: CUDA when present, else CPU)")
    m.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="training progress bar (default: when stderr is a terminal)")
    m.set_defaults(func=cmd_demo)

    d = sub.add_parser("datasets", help="list the named data sets and where they come from")
    d.set_defaults(func=cmd_datasets)
    return p


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks run (temporary folders of atomic writes
    are removed) instead of the process vanishing mid-write."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # not under torchrun with several ranks: it stops the others with SIGTERM when one fails, and a rank blocked
    # in a collective would only see the exception after its timeout (torchrun then kills it, 30 s later)
    catch = threading.current_thread() is threading.main_thread() and os.environ.get("WORLD_SIZE", "1") == "1"
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if catch else None
    try:
        return _run(args)
    finally:
        if catch:  # main() called in-process (tests, notebooks): the caller's handler again
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    try:
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and args.command not in DISTRIBUTED:
            raise IgptError(f"`igpt {args.command}` runs in one process; launch it without torchrun (only "
                            f"{' and '.join(f'`igpt {c}`' for c in DISTRIBUTED)} use several ranks)")
        return args.func(args)
    except Terminated:
        sys.stderr.write("igpt: terminated (SIGTERM)\n")
        return failed(143)
    except IgptError as e:
        sys.stderr.write(f"igpt: error: {e}\n")  # one write: the ranks of a distributed run share the stream
        return failed(2)
    except OSError as e:  # a path that cannot be read or written (a folder given as a file, no permission, a full
        # disk): the file system's own words, on one line; the writes are atomic, so nothing half-written stays
        where = e.filename2 or e.filename or ""  # a rename's target, else the file
        sys.stderr.write(f"igpt: error: {where}{': ' if where else ''}{e.strerror or e}\n")
        return failed(2)
    except KeyboardInterrupt:
        sys.stderr.write("igpt: interrupted\n")
        return failed(130)
    except Exception:  # a bug, or a collective that failed with its peer: a distributed rank prints and ends here
        if _in_process_group():
            import traceback

            traceback.print_exc()
            failed(1)
        raise


def _in_process_group() -> bool:
    """Whether this process has a process group up. Never imports anything: a Ctrl-C or SIGTERM during a
    command's torch import ended here, and importing torch again over the half-imported one segfaulted or
    raised (exit -11 or 1 with a traceback instead of 130 / 143)."""
    mod = sys.modules.get("igpt.distributed")  # imported by every command that can start a process group
    return mod is not None and hasattr(mod, "in_process_group") and mod.in_process_group()


def failed(code: int) -> int:
    """The exit code of a failed command. A rank of a distributed run ends here, while the error is still held
    (releasing it can release the process group): see ``igpt.distributed.exit_failed_rank``."""
    if _in_process_group():
        from igpt.distributed import exit_failed_rank

        exit_failed_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
