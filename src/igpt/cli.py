"""`igpt <command>`: each command parses its flags, builds a typed config and calls one library function.

User errors (``IgptError``) print one line, ``igpt: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from igpt import __version__
from igpt.errors import IgptError

DATA_HELP = ("a named data set ({names}), an image folder (root/<class>/*.png or flat), a CIFAR batch folder "
             "or file, an IDX image file, or an .npz/.npy array file")


def cmd_prepare(args: argparse.Namespace) -> int:
    from igpt.prepare import PrepareConfig, describe, prepare

    cfg = PrepareConfig(
        out=args.out, data=args.data, n_px=args.n_px, palette=args.palette, palette_size=args.palette_size,
        data_dir=args.data_dir, channels=args.channels, val_fraction=args.val_fraction, seed=args.seed,
        skip_bad=args.skip_bad, chunk_size=args.chunk_size, fit_pixels=args.fit_pixels,
    )
    meta = prepare(cfg)
    print(describe(meta))
    if meta["palette_fit"]:
        f = meta["palette_fit"]
        print(f"palette: k-means on {f['pixels']:,} pixels ({f['distinct_colours']:,} distinct colours), "
              f"{f['iterations']} iterations, inertia {f['inertia']:.4g}")
    if meta["skipped"]:
        print(f"skipped {len(meta['skipped'])} unreadable file(s), listed in meta.json")
    print(f"wrote {args.out}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from igpt.datasets import BUNDLED, NAMED

    print(f"{BUNDLED:15s} bundled: the Fashion-MNIST test set (train = first 8,000, test = last 2,000), 28x28 grey")
    for name, spec in NAMED.items():
        print(f"{name:15s} {spec.kind}, from --data-dir / $IGPT_DATA_DIR, /usr/share/datasets/{name}, "
              f"or downloaded from {spec.urls[0]}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from igpt.hf import import_hf

    info = import_hf(args.hf_dir, args.out)
    c = info["config"]
    print(f"imported {args.hf_dir}: {c['n_layer']} layers, {c['n_embd']} wide, {c['n_head']} heads, "
          f"{c['n_px']}x{c['n_px']}, {info['parameters']:,} parameters, palette "
          f"{info['palette'] or 'none (no preprocessor_config.json)'}")
    if info["heads"]:
        print(f"extra heads kept: {', '.join(info['heads'])}")
    if info["note"]:
        print(f"note: {info['note']}")
    print(f"wrote {args.out}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from igpt.hf import export_hf

    info = export_hf(args.checkpoint, args.out)
    if info["dropped_heads"]:
        print(f"note: heads not exported (ImageGPTForCausalImageModeling has none): {', '.join(info['dropped_heads'])}")
    print(f"wrote {args.out} (transformers.ImageGPTForCausalImageModeling.from_pretrained loads it)")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from igpt.sample import sample_to_grid

    ids = sample_to_grid(args.checkpoint, args.n, args.out, complete_from=args.complete_from, rows=args.rows,
                         seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         tokens_out=args.tokens_out, per_image=args.per_image, device=args.device)
    print(f"sampled {len(ids)} image(s); wrote {args.out}" + (f" and {args.tokens_out}" if args.tokens_out else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from igpt.datasets import names

    p = argparse.ArgumentParser(prog="igpt", description="Image GPT: generative pretraining from pixels.")
    p.add_argument("--version", action="version", version=f"igpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "prepare", help="images -> palette ids: token shards for training and evaluation",
        description="Decode images, centre-crop non-square ones, resize to N x N (box filter when shrinking), "
                    "fit or load a colour palette, and write token shards (uint16 .npy), labels, the palette "
                    "and meta.json into OUT, atomically.")
    q.add_argument("--data", default="fashion-mnist-mini", help=DATA_HELP.format(names=", ".join(names())))
    q.add_argument("--data-dir", help="folder holding named data sets as DIR/<name>/ (default $IGPT_DATA_DIR)")
    q.add_argument("--n-px", type=int, default=32, help="image side in pixels (default 32, as the paper)")
    q.add_argument("--palette", default="fit", help="'fit' (k-means on the training pixels) or a palette file: "
                   "palette.npy, OpenAI's kmeans_centers.npy or a Hugging Face preprocessor_config.json")
    q.add_argument("--palette-size", type=int, help="colours for --palette fit (default 512 RGB, 16 grey)")
    q.add_argument("--channels", type=int, choices=(1, 3), help="force grey (1) or RGB (3)")
    q.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out (default 0.1)")
    q.add_argument("--seed", type=int, default=0, help="seed of the validation split and palette fit")
    q.add_argument("--skip-bad", action="store_true", help="skip unreadable image files, counting them")
    q.add_argument("--chunk-size", type=int, default=2048, help="images per chunk (bounds memory)")
    q.add_argument("--fit-pixels", type=int, default=1_000_000, help="pixels sampled for the palette fit")
    q.add_argument("--out", required=True, help="output directory (replaced atomically)")
    q.set_defaults(func=cmd_prepare)

    h = sub.add_parser("import-hf", help="convert a Hugging Face ImageGPT checkpoint into an igpt checkpoint",
                       description="Read a transformers ImageGPT directory (config.json + model.safetensors or "
                                   "pytorch_model.bin, loaded with weights_only=True; preprocessor_config.json "
                                   "for the palette) and write an igpt checkpoint directory.")
    h.add_argument("hf_dir", help="directory as save_pretrained writes it")
    h.add_argument("--out", required=True, help="checkpoint directory to write")
    h.set_defaults(func=cmd_import_hf)

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
    s.add_argument("--top-k", type=int, help="keep the k most likely colours (--top-k 1 is greedy)")
    s.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with probability >= p")
    s.add_argument("--tokens-out", help="also save the generated palette ids, (N, n_px^2), as .npy")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("datasets", help="list the named data sets and where they come from")
    d.set_defaults(func=cmd_datasets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except IgptError as e:
        print(f"igpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("igpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
