"""Sampling and completion on the KV-cached ``igpt.decode.Decoder``, and PNG grids of the results.

Sampling draws one uniform per row from a seeded generator and inverts the cumulative distribution (no
multinomial).
"""

from __future__ import annotations

import io
import math
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from igpt.decode import Decoder
from igpt.errors import IgptError
from igpt.io import atomic_write_bytes, check_writable
from igpt.model import ImageGPT
from igpt.settings import check_seed


# -- choosing the next token ----------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits (B, K) -> scaled logits with every token outside the top-k / nucleus set at -inf (in place). A
    logit tied with the k-th largest is kept (as transformers' top-k does), so a row can keep more than k."""
    if temperature != 1.0:  # the row maximum first to 0: a tiny temperature then gives -inf elsewhere, not inf - inf
        fi = torch.finfo(logits.dtype)  # and within the logits' range: 1e-50 was 0 in float32 (0 / 0 = NaN)
        logits.sub_(logits.amax(-1, keepdim=True)).div_(min(max(temperature, fi.tiny), fi.max))
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, dim=-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # the mass before this token already reaches top_p
        drop[..., 0] = False  # the most likely token always stays: a top_p below float32's range (1e-50) is 0
        logits.scatter_(-1, order, srt.masked_fill_(drop, float("-inf")))
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature > 0 or not math.isfinite(temperature):
        raise IgptError(f"--temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise IgptError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise IgptError(f"--top-p must be in (0, 1], got {top_p}")


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                bad: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one id per row from softmax(filtered logits / temperature) -> (B,) long. top_k=1 is argmax.

    Inverse-CDF sampling with one uniform per row: the first token whose cumulative probability exceeds
    u * total. A filtered-out token has probability 0, so its cumulative sum equals its predecessor's and it
    can never be picked. (At (8, 512) on 2 cores: 27 us, against 120 for multinomial and 100 for Gumbel-max.)
    ``u`` is a (B, 1) float32 buffer; ``logits`` is overwritten. ``bad`` (B,) bool, if given, is or-ed with
    the rows whose logits were not finite (NaN or inf made the pick meaningless: the last id, or the NaN's
    position); checked by the caller once per batch, not per token (no device sync per step).
    """
    if top_k == 1:
        if bad is not None:
            bad.logical_or_(~torch.isfinite(logits).all(-1))
        return logits.argmax(-1)
    cdf = torch.softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1).cumsum_(-1)  # (B, K)
    if bad is not None:  # a NaN or +inf logit makes the total NaN
        bad.logical_or_(~torch.isfinite(cdf[:, -1]))
    v = u.uniform_(generator=generator).mul_(cdf[:, -1:])
    return torch.searchsorted(cdf, v, right=True).squeeze_(1).clamp_max_(cdf.shape[-1] - 1)


def generate(model: ImageGPT, n: int, *, prefix: torch.Tensor | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             batch_size: int | None = None, cuda_graph: bool = False) -> torch.Tensor:
    """Sample ``n`` images -> palette ids (n, n_px^2) long, on CPU.

    ``prefix`` (n, P) ids: the first P pixels of each image, kept unchanged (completion); None: unconditional.
    ``top_k=1`` is greedy. The same seed, n and batch size give the same images. Batches default to the
    most that keep the KV cache under ~1 GiB. ``cuda_graph`` (CUDA models only): each decode step is one
    replayed CUDA graph of ``Decoder.step_static``; the sampling itself stays outside the graph.
    """
    check_sampling(temperature, top_k, top_p)
    check_seed(seed, "sample")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:  # numpy integers are Integral
        raise IgptError(f"the number of images must be an integer >= 0, got {n!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise IgptError(f"batch_size must be a positive integer, got {batch_size!r}")
    cfg = model.config
    T, dev = cfg.seq_len, next(model.parameters()).device
    if cuda_graph and dev.type != "cuda":
        raise IgptError(f"cuda_graph needs a model on a CUDA device, not {dev.type}")
    if prefix is not None:
        if prefix.ndim != 2 or prefix.shape[0] != n or prefix.shape[1] >= T:
            raise IgptError(f"prefix must be ({n}, < {T}) ids, got {tuple(prefix.shape)}")
        if prefix.is_floating_point() or prefix.is_complex() or prefix.dtype == torch.bool:
            raise IgptError(f"prefix must hold integer palette ids, got {prefix.dtype}")
        prefix = prefix.long()  # uint16, the dtype of token shards, has no min / max on CPU
        if prefix.numel() and not (0 <= int(prefix.min()) and int(prefix.max()) < cfg.palette_size):
            raise IgptError(f"prefix ids must be palette ids in [0, {cfg.palette_size}), got "
                            f"[{int(prefix.min())}, {int(prefix.max())}]")
    P = 0 if prefix is None else prefix.shape[1]
    if batch_size is None:
        per_image = 2 * cfg.n_layer * T * cfg.n_embd * next(model.parameters()).element_size()
        batch_size = max(1, min(n, (1 << 30) // per_image))
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = torch.empty(n, T, dtype=torch.long)
    for lo in range(0, n, batch_size):
        B = min(batch_size, n - lo)
        with torch.inference_mode():
            dec = Decoder(model, B, static=cuda_graph)
            if cuda_graph:
                dec.capture()
            ids = torch.full((B, 1 + P), cfg.sos_id, dtype=torch.long, device=dev)  # [SOS, prefix]
            if P:
                ids[:, 1:] = prefix[lo:lo + B].to(dev)
            u = torch.empty(B, 1, dtype=torch.float32, device=dev)
            bad = torch.zeros(B, dtype=torch.bool, device=dev)
            toks = list(ids[:, 1:].unbind(1))
            tok = pick_tokens(dec.prefill(ids), u, gen, temperature, top_k, top_p, bad)
            toks.append(tok)
            for _ in range(P + 1, T):
                tok = pick_tokens(dec.step(tok), u, gen, temperature, top_k, top_p, bad)
                toks.append(tok)
            if bad.any():
                raise IgptError(f"the model produced non-finite logits (NaN or inf) for {int(bad.sum())} of "
                                f"{B} images: its weights are damaged or training diverged")
            batch = torch.stack(toks, 1).cpu()
        out[lo:lo + B] = batch  # out stays a normal tensor (not an inference-mode one)
    return out


# -- pictures -------------------------------------------------------------------------------------------------
def tokens_to_images(tokens: np.ndarray, palette, n_px: int) -> np.ndarray:
    """ids (N, n_px^2) -> uint8 images (N, n_px, n_px, C) through the palette's colours."""
    pix = palette.dequantize(np.asarray(tokens).astype(np.int64))  # (N, T, C)
    return pix.reshape(len(pix), n_px, n_px, pix.shape[-1])


def image_grid(cells: list[list[np.ndarray | None]], scale: int = 4, pad: int = 2) -> np.ndarray:
    """Rows of equally sized uint8 (h, w, C) images (None = blank) -> one uint8 (H, W, C) grid, each image
    upscaled ``scale`` times with nearest neighbour and separated by ``pad`` white pixels."""
    first = next(c for row in cells for c in row if c is not None)
    h, w, C = first.shape
    ncol = max(len(r) for r in cells)
    gh, gw = h * scale + pad, w * scale + pad
    grid = np.full((len(cells) * gh + pad, ncol * gw + pad, C), 255, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, img in enumerate(row):
            if img is not None:
                big = img.repeat(scale, axis=0).repeat(scale, axis=1)
                grid[pad + i * gh: pad + i * gh + h * scale, pad + j * gw: pad + j * gw + w * scale] = big
    return grid


def save_png(grid: np.ndarray, path: str | Path) -> None:
    """Write a uint8 (H, W, 1 or 3) array as a PNG, atomically."""
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_npy(array: np.ndarray, path: str | Path) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def completion_cells(originals: np.ndarray, rows: int, completions: np.ndarray, per_image: int):
    """Grid rows [original | top `rows` rows (rest grey) | per_image completions] for each original."""
    cells = []
    for i, orig in enumerate(originals):
        half = orig.copy()
        half[rows:] = 128
        comp = list(completions[i * per_image:(i + 1) * per_image])
        cells.append([orig, half, *comp])
    return cells


def load_split(shards: str | Path, n_px: int, palette_size: int, palette=None) -> tuple[np.ndarray, str]:
    """Token images from prepared shards: the test split, else val -> (uint16 (N, n_px^2), split name). With the
    checkpoint's ``palette``, shards made with another palette are refused (their ids mean other colours)."""
    from igpt.shards import load_shards

    sh = load_shards(shards)
    if sh.n_px != n_px or sh.palette.k != palette_size:
        raise IgptError(f"{shards}: shards are {sh.n_px}px with {sh.palette.k} colours, "
                        f"the model wants {n_px}px with {palette_size}")
    if palette is not None and palette.hash != sh.palette.hash:
        raise IgptError(f"{shards}: the shards were made with another palette than the checkpoint's")
    for split in ("test", "val"):
        if split in sh.splits and len(sh.tokens(split)):
            return sh.tokens(split), split
    raise IgptError(f"{shards}: no test or val images to complete from")


def check_memory(n: int, n_px: int, channels: int, cells: int | None = None) -> None:
    """IgptError when n images' ids (int64) and their PNG grid of ``cells`` images (default n; upscaled to ~128
    px) would not fit in this machine's memory (a typo in --n ended in an allocator traceback after loading the
    model). A lower bound: the grid's copies on the way to the PNG are not counted."""
    scale = max(1, 128 // n_px)
    cells = n if cells is None else cells
    need = n_px * n_px * (n * (8 + 2) + cells * scale * scale * channels)  # ids as int64 and uint16, the grid
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX): no check
        return
    if need > have:
        raise IgptError(f"--n {n}: the ids and the PNG grid need about {need / 2**30:.1f} GiB, more than this "
                        f"machine's {have / 2**30:.1f} GiB; sample fewer images per run (other --seed values)")


def _written_at(path: str | Path) -> Path:
    path = Path(path)
    return path.parent.resolve() / path.name


def sample_to_grid(ckpt: str | Path, n: int, out_png: str | Path, *, complete_from: str | Path | None = None,
                   rows: int | None = None, seed: int = 0, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, tokens_out: str | Path | None = None, per_image: int = 4,
                   device: str | None = None, cuda_graph: bool = False) -> np.ndarray:
    """Sample ``n`` images from checkpoint ``ckpt`` and write a PNG grid; returns the ids (n, n_px^2) uint16.

    Unconditional: a grid of n images. With ``complete_from`` (token shards): the first ceil(n / per_image)
    images of the test split (else val) keep their top ``rows`` rows (default n_px // 2) and get per_image
    completions each; grid rows are original | top rows | completions. ``tokens_out`` saves the ids (.npy).
    ``device`` None: CUDA when present, else CPU. ``cuda_graph``: see :func:`generate` (CUDA only).
    """
    from igpt.checkpoint import load_model
    from igpt.distributed import get_dist_info, pick_device
    from igpt.palette import Palette

    if n < 1:
        raise IgptError(f"--n must be >= 1, got {n}")
    if per_image < 1:
        raise IgptError(f"--per-image must be >= 1, got {per_image}")
    check_sampling(temperature, top_k, top_p)
    # the same file (a rename replaces a link itself, so only the folders are resolved): the .npy replaced the PNG
    if tokens_out is not None and _written_at(tokens_out) == _written_at(out_png):
        raise IgptError(f"--tokens-out {tokens_out} is the --out PNG's path; give the ids another file")
    for path in (out_png, tokens_out):  # before minutes of sampling, not after
        if path is not None:
            check_writable(path)
    dev = pick_device(device, get_dist_info())
    if cuda_graph and dev.type != "cuda":
        raise IgptError(f"--cuda-graph needs a CUDA device, not {dev}")
    model, palette = load_model(ckpt, device=dev)
    cfg = model.config
    if not model.lm_head.weight.any():
        raise IgptError(f"{ckpt}: the output head is all zeros (an untrained model, or one imported from a "
                        "Hugging Face checkpoint without lm_head): its samples would be uniform noise")
    per_image = min(per_image, n)  # a completion grid has, per original, the original, its top rows, completions
    cells = n if complete_from is None else -(-n // per_image) * (2 + per_image)
    check_memory(n, cfg.n_px, palette.channels if palette is not None else 3, cells)
    prefix = originals = None
    if complete_from is not None:
        rows = cfg.n_px // 2 if rows is None else rows
        if not 1 <= rows < cfg.n_px:
            raise IgptError(f"--rows must be in [1, {cfg.n_px - 1}], got {rows}")
        toks, _ = load_split(complete_from, cfg.n_px, cfg.palette_size, palette)
        m = -(-n // per_image)
        if m > len(toks):
            raise IgptError(f"{complete_from}: {len(toks)} images, fewer than the {m} needed for {n} completions")
        originals = np.asarray(toks[:m]).astype(np.int64)
        prefix = torch.from_numpy(originals[:, : rows * cfg.n_px]).repeat_interleave(per_image, 0)[:n]
        if palette is None:
            palette = Palette.load(Path(complete_from) / "palette.npy")
    elif rows is not None:
        raise IgptError("--rows needs --complete-from")
    if palette is None:
        raise IgptError(f"{ckpt}: the checkpoint has no palette.npy, so samples cannot be turned into colours")
    if palette.k != cfg.palette_size:
        raise IgptError(f"palette has {palette.k} colours but the model has {cfg.palette_size}")
    ids = generate(model, n, prefix=prefix, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   cuda_graph=cuda_graph)
    ids = ids.numpy().astype(np.uint16)
    imgs = tokens_to_images(ids, palette, cfg.n_px)
    if originals is None:
        ncol = max(1, math.ceil(math.sqrt(n)))
        cells = [list(imgs[i:i + ncol]) for i in range(0, n, ncol)]
    else:
        cells = completion_cells(tokens_to_images(originals, palette, cfg.n_px), rows, imgs, per_image)
    save_png(image_grid(cells, scale=max(1, 128 // cfg.n_px)), out_png)
    if tokens_out is not None:
        save_npy(ids, tokens_out)
    return ids
