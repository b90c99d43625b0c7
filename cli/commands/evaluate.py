"""`linearsr eval`: the command over linearsr.trainer.evaluate (the rows and files are described there)."""

from __future__ import annotations

import argparse
import os

from linearsr.trainer.evaluate import BICUBIC, evaluate, upscale_only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle folder (manifest.json) or an expert .safetensors")
    parser.add_argument("--hr", default=None, help="folder of HR photos (e.g. runs/data/devset)")
    parser.add_argument("--lr", default=None, help="folder of real LR images: with --hr, paired by name "
                        "(metrics against the HR); alone, LR-only (outputs and timing, no metrics)")
    parser.add_argument("--out", required=True, help="output folder for report.md, metrics.json, crops/")
    parser.add_argument("--degradation", default="bicubic", choices=["bicubic", "realistic"])
    parser.add_argument("--steps", type=int, default=10, help="the multi-step setting (1-NFE is always measured)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=BUNDLE",
                        help="another bundle to ablate against, e.g. knee=runs/demo/knee (repeatable)")
    parser.add_argument("--baseline", action="append", default=[], choices=["realesrgan"],
                        help="another SR system as a row: realesrgan (Real-ESRGAN x4plus on the CPU, `make peers`); "
                             "skipped with a note when it cannot run here (repeatable)")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--ablation-guidance", type=float, default=3.0,
                        help="the stronger classifier-free guidance scale of the TAG ablation (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images (sorted by name)")
    parser.add_argument("--no-tb", action="store_true", help="do not write TensorBoard events")


def run(args: argparse.Namespace) -> int:
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    compare = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--compare {item!r} is not NAME=BUNDLE (e.g. knee=runs/demo/knee)")
        compare[name] = path
    if args.hr is None and args.lr is None:
        raise ValueError("give --hr HR_DIR (synthetic LR), --hr with --lr LR_DIR (real pairs) or --lr alone (LR-only)")
    if args.hr is None:
        metrics = upscale_only(args.bundle, args.lr, args.out, args.steps, args.guidance, args.seed, args.max_images)
        print(f"upscaled {metrics['num_images']} LR images: {os.path.join(args.out, 'sr')}")
        print(f"report: {os.path.join(args.out, 'report.md')}")
        return 0
    metrics = evaluate(args.bundle, args.hr, args.out, args.degradation, args.steps, compare, args.guidance,
                       args.seed, args.max_images, tb=not args.no_tb, lr_dir=args.lr, baselines=tuple(args.baseline),
                       ablation_guidance=args.ablation_guidance)
    base, one = metrics["summary"][BICUBIC], metrics["summary"]["LinearSR 1-NFE"]
    print(f"bicubic {base['psnr_y']:.2f} dB, LinearSR 1-NFE {one['psnr_y']:.2f} dB "
          f"({one['psnr_y'] - base['psnr_y']:+.2f}) on {metrics['num_images']} images")
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0
