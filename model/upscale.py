"""`linearsr upscale --bundle PATH INPUT... --out DIR`: write DIR/<stem>.png at x scale for each input.

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

from linearsr.model.bundle import load_bundle
from linearsr.model.imageio import ImageError, load_image, save_png, to_uint8
from linearsr.model.sampler import METHODS, MoE
from linearsr.model.tags import normalize_tags
from linearsr.model.tiling import upscale_image

log = logging.getLogger("linearsr.upscale")

TagFn = Callable[[torch.Tensor], list[str]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--bundle", required=True, help="bundle folder (manifest.json) or one expert .safetensors")
    parser.add_argument("--out", required=True, help="output folder; writes OUT/<stem>.png")
    parser.add_argument("--steps", type=int, default=1, help="sampler steps (default 1 = one network evaluation, "
                                                             "the best PSNR; 10 gives sharper texture)")
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
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels, blended (default 16)")
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


def make_tag_fn(args: argparse.Namespace, moe: MoE) -> TagFn | None:
    """The tag source for images without --tags: external tagger > bundle tagger > none."""
    max_tags = moe.cfg.max_tags
    if args.tags is not None:
        fixed = normalize_tags(args.tags, max_tags)
        moe.experts[0].tag_embed.check(fixed)  # an unseen tag: refused (hash) or logged with its nearest (MiniLM)
        return lambda lr: fixed
    if args.tagger:
        external = load_external_tagger(args.tagger)

        def tag_external(lr: torch.Tensor) -> list[str]:
            tags = external(Image.fromarray(to_uint8(lr)))
            if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
                raise ValueError(f"--tagger {args.tagger!r} returned {tags!r}; it must return a list of strings")
            return normalize_tags(tags, max_tags)

        return tag_external
    if moe.tagger is not None:
        tagger = moe.tagger
        return lambda lr: tagger.predict(lr[None], max_tags=max_tags, threshold=args.tag_threshold)[0]
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
    if args.tile and (args.tile < 8 or not 0 <= args.overlap < args.tile // 2):
        raise ValueError(f"--tile {args.tile} --overlap {args.overlap}: tiles need tile >= 8 and 0 <= overlap < tile/2 "
                         f"(e.g. --tile {max(8, 2 * args.overlap + 2)}), or --tile 0 for no tiling")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available; use --device cpu")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the upscaled images")
    moe = load_bundle(args.bundle).to(args.device)
    s = moe.scale
    log.info("bundle %s: %d expert(s), x%d, %s x %d step(s)", args.bundle, len(moe.experts), s, args.sampler, args.steps)
    tag_fn = make_tag_fn(args, moe)
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
        hr = upscale_image(moe, lr, tags, args.steps, args.sampler, args.guidance, args.seed,
                           tile=args.tile or None, overlap=args.overlap, progress=True)
        path = save_png(targets[inp], hr)
        log.info("%s: wrote %s in %.2f s", inp, path, time.perf_counter() - start)
    if failed:
        print(f"linearsr upscale: {len(failed)} of {len(args.inputs)} input(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
