"""`linearsr upscale --bundle PATH INPUT... --out DIR`: write DIR/<stem>.png at x scale for each input.
The command line of the Python API in model/inference.py (`from linearsr import Upscaler`).

Each input is handled on its own: a missing, unreadable, truncated or unsupported image gets a
one-line message and the others are still processed; the exit code is 1 if any failed.
Tags: `--tags "a, b"` for every image; otherwise the bundle's tagger, or an external tagger
(`--tagger module:function`, a callable taking a PIL image and returning tag strings)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm import tqdm

from linearsr.core.util import normalize_tags
from linearsr.model.imageio import ImageError, load_image, save_png, to_uint8
from linearsr.model.inference import DTYPES, Upscaler, check_device_dtype
from linearsr.model.sampler import METHODS
from linearsr.model.tiling import TILE_MODES, check_tiling, resolve_tile_mode

log = logging.getLogger("linearsr.upscale")

TagFn = Callable[[torch.Tensor], list[str]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--bundle", required=True, help="bundle folder (manifest.json) or one expert .safetensors")
    parser.add_argument("--out", required=True, help="output folder; writes OUT/<stem>.png")
    parser.add_argument("--steps", type=int, default=1,
                        help="sampler steps (default 1 = one network evaluation at t = 1, which training draws "
                             "flow.t1_fraction of the time); more steps run on the even grid through the bundle's "
                             "training shift (manifest sampling.shift, as training drew t), each step on the expert "
                             "that owns its log-SNR")
    parser.add_argument("--sampler", choices=METHODS, default="euler", help="ODE sampler (default euler)")
    parser.add_argument("--tags", default=None, help='comma-separated tags for every image, e.g. "cat, grass"')
    parser.add_argument("--tagger", default=None, metavar="MODULE:FUNCTION",
                        help="external tagger: a callable taking a PIL image and returning a list of tags")
    parser.add_argument("--tag-threshold", type=float, default=None,
                        help="one probability threshold for every tag of the bundle's tagger (default: each tag's own, "
                             "chosen on held-out photos for precision)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale on the tags (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--tile", type=int, default=256,
                        help="largest LR tile side in pixels (bounds memory; default 256); 0 = whole image in one pass")
    parser.add_argument("--tile-mode", choices=TILE_MODES, default="auto",
                        help="exact: the untiled result, every attention state summed over all tiles; blend: "
                             "overlapping tiles blended (for models where exact does not hold); auto (default): "
                             "exact where it holds")
    parser.add_argument("--overlap", type=int, default=16, help="blended tiles' overlap in LR pixels (default 16)")
    parser.add_argument("--batch", type=int, default=1, help="tiles evaluated together (default 1; more is faster "
                                                            "on a GPU and costs memory)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="network precision (default fp32); bf16 on CPUs and GPUs, fp16 on GPUs only")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (pays off over many images)")
    parser.add_argument("--ae-path", default=None, help="a latent bundle's autoencoder folder on this machine (default: "
                                                         "model.ae_path as trained)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_external_tagger(spec: str) -> Callable[[Image.Image], list[str]]:
    """'package.module:function' -> the callable (PIL image -> list of tag strings)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--tagger {spec!r} is not 'module:function' (e.g. 'mytags.clip:tag_image')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--tagger: cannot import module {module_name!r} ({e}); is it installed or on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--tagger: {module_name!r} has no callable {attr!r}")
    return fn


def make_tag_fn(args: argparse.Namespace, up: Upscaler) -> TagFn | None:
    """The tag source for images without --tags: external tagger > bundle tagger > none."""
    max_tags = up.moe.cfg.max_tags
    if args.tags is not None:
        fixed = normalize_tags(args.tags, max_tags)
        up.moe.experts[0].tag_embed.check(fixed)  # an unseen tag: refused (hash) or logged with its nearest (MiniLM)
        return lambda lr: fixed
    if args.tagger:
        external = load_external_tagger(args.tagger)

        def tag_external(lr: torch.Tensor) -> list[str]:
            tags = external(Image.fromarray(to_uint8(lr)))
            if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
                raise ValueError(f"--tagger {args.tagger!r} returned {tags!r}; it must return a list of strings")
            return normalize_tags(tags, max_tags)

        return tag_external
    if up.moe.tagger is not None:
        return lambda lr: up.tags_for(lr, args.tag_threshold)
    return None


def _output_paths(inputs: list[str], out: Path) -> dict[str, Path]:
    """INPUT -> OUT/<stem>.png; inputs sharing a stem get <stem>_2.png, ... (logged)."""
    paths, used = {}, set()
    for inp in inputs:
        stem, n = Path(inp).stem, 1
        name = f"{stem}.png"
        while name in used:
            n += 1
            name = f"{stem}_{n}.png"
        if n > 1:
            log.warning("%s: another input is also named %s; writing %s", inp, stem, name)
        used.add(name)
        paths[inp] = out / name
    return paths


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    check_tiling(args.tile, args.overlap, args.tile_mode, args.batch)
    check_device_dtype(args.device, args.dtype)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the upscaled images")
    up = Upscaler(args.bundle, args.device, args.dtype, args.compile, args.ae_path)
    check_tiling(args.tile, args.overlap, resolve_tile_mode(up.moe.experts[0], args.tile_mode), args.batch)
    s = up.scale
    log.info("bundle %s: %d expert(s), x%d, %s x %d step(s), %s on %s", args.bundle, len(up.moe.experts), s,
             args.sampler, args.steps, args.dtype, args.device)
    tag_fn = make_tag_fn(args, up)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    targets = _output_paths(args.inputs, out)
    for inp in tqdm(args.inputs, desc="images", unit="img", disable=len(args.inputs) < 2):
        try:
            lr, notes = load_image(inp)
        except (ImageError, FileNotFoundError) as e:
            log.error("%s", e)
            failed.append(inp)
            continue
        for note in notes:
            log.warning("%s: %s", inp, note)
        try:
            tags = tag_fn(lr) if tag_fn else []
        except Exception as e:  # an external tagger's failure costs this image, not the batch
            log.error("%s: the tagger failed (%s: %s)", inp, type(e).__name__, e)
            failed.append(inp)
            continue
        log.info("%s: %dx%d -> %dx%d, tags: %s", inp, lr.shape[2], lr.shape[1], lr.shape[2] * s, lr.shape[1] * s,
                 ", ".join(tags) if tags else "(none)")
        start = time.perf_counter()
        hr = up(lr, tags, args.steps, args.sampler, args.guidance, args.seed, tile=args.tile, overlap=args.overlap,
                tile_mode=args.tile_mode, batch=args.batch, progress=True)
        path = save_png(targets[inp], hr)
        log.info("%s: wrote %s in %.2f s", inp, path, time.perf_counter() - start)
    if failed:
        print(f"linearsr upscale: {len(failed)} of {len(args.inputs)} input(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
