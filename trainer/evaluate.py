"""`linearsr eval`: a bundle against bicubic on a folder of HR photos, with ablations and pictures.

For every HR image: modcrop to the scale, make the LR (bicubic x s, or the seeded realistic
degradation), upscale with each variant, and measure PSNR-Y / SSIM-Y (border = scale) and LPIPS
(AlexNet; skipped with a note when its weights are absent — never faked). Variants:

    bicubic                       the baseline, always, same images, same run
    <bundle> 1-NFE / N steps      the MoE bundle, tags from its tagger (or none)
    <bundle> 1-NFE / N, no tags / shuffled tags / CFG <s>   the TAG ablation (with a tagger): no tags,
                                  another image's tags, classifier-free guidance at scale s
    <name>   1-NFE / N steps      every --compare NAME=BUNDLE (e.g. the knee model alone)

Writes OUT/metrics.json, OUT/report.md, OUT/crops/<image>.png (bicubic | 1-NFE | N-step | HR)
and the same grid to TensorBoard under OUT/tb."""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from linearsr.data.config import DegradationConfig
from linearsr.data.degrade import bicubic_down, modcrop
from linearsr.data.degradations import degrade
from linearsr.model.bundle import load_bundle
from linearsr.model.imageio import save_png
from linearsr.model.sampler import MoE, sample
from linearsr.trainer.quality import LPIPS, lpips_weights_path, psnr_y, ssim_y
from linearsr.trainer.rundir import write_json, write_text_atomic

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
BICUBIC = "bicubic"


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # key into the loaded bundles
    steps: int
    use_tags: bool
    shuffled: bool = False  # the tags of another image (wrong tags)
    guidance: float | None = None  # None: the evaluation's --guidance


def load_hr_images(folder: str, max_images: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """(stem, [3, H, W] float in [0, 1]) for every image in the folder, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"HR folder {folder} does not exist; `make devset` writes the development set to runs/data/devset")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"HR folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out = []
    for p in files[:max_images]:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except OSError as e:
            log.warning("skipping %s: not a readable image (%s)", p, e)
            continue
        out.append((p.stem, torch.from_numpy(arr).permute(2, 0, 1).contiguous()))
    if not out:
        raise ValueError(f"no readable image in {folder}")
    return out


def _image(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def load_lr_images(lr_dir: str, hr_dir: str | None, scale: int, max_images: int | None = None
                   ) -> tuple[list[tuple[str, torch.Tensor | None, torch.Tensor]], list[dict]]:
    """(stem, HR or None, real LR) of an LR folder, paired by name with the HR folder when one is
    given, and the bad pairs [{"source", "error"}] (each warned and reported: none dropped silently)."""
    from linearsr.data import pairs

    def listing(folder: str) -> list[Path]:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    lrs = listing(lr_dir)
    if not lrs:
        raise ValueError(f"LR folder {lr_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if hr_dir is None:
        return [(p.stem, None, _image(p)) for p in lrs[:max_images]], []
    hrs = listing(hr_dir)
    partners, bad = pairs.match([(str(p), p.name) for p in hrs], [(str(p), p.name) for p in lrs], lr_dir)
    out = []
    for p in hrs:
        if p.name in partners and len(out) != max_images:
            hr, lr = _image(p), _image(Path(partners[p.name]))
            try:
                if pairs.scale_of((hr.shape[2], hr.shape[1]), (lr.shape[2], lr.shape[1]), None) != scale:
                    raise ValueError(f"HR {hr.shape[2]}x{hr.shape[1]} / LR {lr.shape[2]}x{lr.shape[1]} is not "
                                     f"the bundle's x{scale}")
            except ValueError as e:
                bad.append({"source": p.name, "error": str(e)})
                continue
            out.append((p.stem, hr, lr))
    for b in bad:
        log.warning("skipping %s: %s", b["source"], b["error"])
    if not out:
        raise ValueError(f"no usable LR/HR pair in {lr_dir} and {hr_dir} ({len(bad)} bad pairs, listed above)")
    return out, bad


def make_lr(hr: torch.Tensor, scale: int, mode: str, seed: int) -> torch.Tensor:
    if mode == "bicubic":
        return bicubic_down(hr, scale)
    return degrade(hr, DegradationConfig(mode="realistic"), scale, seed=seed)


def bicubic_up(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lr[None], scale_factor=scale, mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _texture_crop(hr: torch.Tensor, size: int) -> tuple[int, int]:
    """Top-left corner of the size x size window with the most gradient energy (where SR shows)."""
    y = hr.mean(0)
    energy = (y[1:, :-1] - y[:-1, :-1]).abs() + (y[:-1, 1:] - y[:-1, :-1]).abs()
    size = min(size, *energy.shape)
    pooled = F.avg_pool2d(energy[None, None], size, stride=max(1, size // 4))[0, 0]
    idx = int(torch.argmax(pooled))
    return (idx // pooled.shape[1]) * max(1, size // 4), (idx % pooled.shape[1]) * max(1, size // 4)


def side_by_side(panels: list[torch.Tensor], hr: torch.Tensor, size: int = 128, zoom: int = 2) -> np.ndarray:
    """One row of same-place crops (each panel [3, H, W]), zoomed with nearest neighbour, 4px gaps."""
    top, left = _texture_crop(hr, size)
    size = min(size, hr.shape[1], hr.shape[2])
    gap = torch.ones(3, size * zoom, 4)
    row = []
    for p in panels:
        crop = p[:, top:top + size, left:left + size]
        row += [crop.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2), gap]
    grid = torch.cat(row[:-1], dim=2)
    return (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _measure(sr: torch.Tensor, hr: torch.Tensor, scale: int, lpips: LPIPS | None) -> dict:
    m = {"psnr_y": psnr_y(sr, hr, border=scale), "ssim_y": ssim_y(sr, hr, border=scale)}
    if lpips is not None:
        m["lpips"] = float(lpips(sr[None], hr[None]).item())
    return m


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return float(np.mean(vals)) if vals else None


def evaluate(
    bundle: str,
    hr_dir: str,
    out_dir: str,
    degradation: str = "bicubic",
    steps: int = 10,
    compare: dict[str, str] | None = None,
    guidance: float = 1.0,
    seed: int = 0,
    max_images: int | None = None,
    max_tags: int = 4,
    tb: bool = True,
    lr_dir: str | None = None,
    ablation_guidance: float = 3.0,
) -> dict:
    """Run the evaluation and write metrics.json, report.md and crops; returns the metrics dict.
    With `lr_dir` the LR images are real ones from that folder, paired with `hr_dir` by name."""
    if degradation not in ("bicubic", "realistic"):
        raise ValueError(f"--degradation must be bicubic or realistic, got {degradation!r}")
    if steps < 2:
        raise ValueError(f"--steps is the multi-step setting and must be >= 2 (1-NFE is always measured), got {steps}")
    models: dict[str, MoE] = {"bundle": load_bundle(bundle)}
    for name, path in (compare or {}).items():
        models[name] = load_bundle(path)
    scale = models["bundle"].scale
    for name, m in models.items():
        if m.scale != scale:
            raise ValueError(f"--compare {name} upscales x{m.scale} but the bundle upscales x{scale}; compare like with like")
    tagger = models["bundle"].tagger
    variants = [Variant("LinearSR 1-NFE", "bundle", 1, True), Variant(f"LinearSR {steps}-step", "bundle", steps, True)]
    if tagger is not None:
        for n, label in ((1, "1-NFE"), (steps, f"{steps}-step")):
            variants += [Variant(f"LinearSR {label}, no tags", "bundle", n, False),
                         Variant(f"LinearSR {label}, shuffled tags", "bundle", n, True, shuffled=True),
                         Variant(f"LinearSR {label}, CFG {ablation_guidance:g}", "bundle", n, True, guidance=ablation_guidance)]
    for name in compare or {}:
        variants += [Variant(f"{name} 1-NFE", name, 1, True), Variant(f"{name} {steps}-step", name, steps, True)]

    lpips_note = None
    try:
        lpips = LPIPS.load()
    except FileNotFoundError:
        lpips, lpips_note = None, f"LPIPS skipped: weights not found at {lpips_weights_path()} (run `make weights` in the checkout, or set LINEARSR_LPIPS_WEIGHTS to the file)"
        log.warning(lpips_note)

    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    if lr_dir is not None:  # real LR/HR pairs
        images, bad_pairs = load_lr_images(lr_dir, hr_dir, scale, max_images)
        degradation = "real"
    else:
        images, bad_pairs = [(stem, modcrop(hr, scale), None) for stem, hr in load_hr_images(hr_dir, max_images)], []
    per_image: dict[str, dict[str, dict]] = {}
    grids = []
    lrs = [real_lr if real_lr is not None else make_lr(hr, scale, degradation, seed + idx)
           for idx, (_, hr, real_lr) in enumerate(images)]
    image_tags = [tagger.predict(lr[None], max_tags=max_tags)[0] if tagger is not None else [] for lr in lrs]
    for idx, (stem, hr, _) in enumerate(images):
        lr, tags = lrs[idx], image_tags[idx]
        wrong = _wrong_tags(image_tags, idx, tagger, max_tags)
        results = {BICUBIC: {**_measure(bicubic_up(lr, scale), hr, scale, lpips), "seconds": 0.0, "nfe": 0}}
        outputs = {BICUBIC: bicubic_up(lr, scale)}
        for v in variants:
            start = time.perf_counter()
            res = sample(models[v.model], lr[None], [wrong if v.shuffled else tags if v.use_tags else []], steps=v.steps,
                         guidance=guidance if v.guidance is None else v.guidance, seed=seed + idx)
            seconds = time.perf_counter() - start
            outputs[v.name] = res.image[0]
            results[v.name] = {**_measure(res.image[0], hr, scale, lpips), "seconds": seconds, "nfe": res.nfe}
        results["_tags"] = tags
        per_image[stem] = results
        grid = side_by_side([outputs[BICUBIC], outputs[variants[0].name], outputs[variants[1].name], hr], hr)
        Image.fromarray(grid).save(out / "crops" / f"{stem}.png")
        grids.append((stem, grid))
        log.info("eval %d/%d %s: bicubic %.2f dB, %s %.2f dB", idx + 1, len(images), stem,
                 results[BICUBIC]["psnr_y"], variants[0].name, results[variants[0].name]["psnr_y"])

    summary = {}
    for name in [BICUBIC] + [v.name for v in variants]:
        rows = [per_image[s][name] for s in per_image]
        summary[name] = {k: _mean(rows, k) for k in ("psnr_y", "ssim_y", "lpips", "seconds", "nfe")}
    metrics = {
        "bundle": bundle, "hr_dir": hr_dir, "degradation": degradation, "scale": scale, "steps": steps,
        "guidance": guidance, "seed": seed, "num_images": len(images), "lpips_note": lpips_note,
        "lr_dir": lr_dir, "bad_pairs": bad_pairs,
        "summary": summary, "per_image": per_image, "checks": _quality_checks(summary, variants),
    }
    write_json(str(out / "metrics.json"), metrics)
    write_text_atomic(str(out / "report.md"), render_report(metrics, variants))
    if tb:
        _log_tensorboard(out / "tb", grids, summary)
    return metrics


def _wrong_tags(image_tags: list[list[str]], idx: int, tagger, max_tags: int) -> list[str]:
    """Shuffled tags for image idx: the next image's tags that differ from its own; else the
    tagger's tags it does not have."""
    others = [t for t in image_tags[idx + 1:] + image_tags[:idx] if t and t != image_tags[idx]]
    if others:
        return others[0]
    return [t for t in (tagger.emitted if tagger is not None else []) if t not in image_tags[idx]][:max_tags]


def _quality_checks(summary: dict, variants: list[Variant]) -> dict:
    """The bar the demo is held to: +0.5 dB PSNR-Y at 1-NFE, lower LPIPS than bicubic multi-step."""
    base = summary[BICUBIC]
    one, multi = summary[variants[0].name], summary[variants[1].name]
    checks = {"psnr_gain_1nfe_db": one["psnr_y"] - base["psnr_y"]}
    checks["psnr_gain_ok"] = checks["psnr_gain_1nfe_db"] >= 0.5
    if base["lpips"] is not None:
        checks["lpips_multistep_minus_bicubic"] = multi["lpips"] - base["lpips"]
        checks["lpips_ok"] = multi["lpips"] < base["lpips"]
    return checks


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def render_report(metrics: dict, variants: list[Variant]) -> str:
    s = metrics["summary"]
    base = s[BICUBIC]
    lines = [
        "# LinearSR evaluation", "",
        f"- bundle: `{metrics['bundle']}`",
        f"- images: {metrics['num_images']} from `{metrics['hr_dir']}`, x{metrics['scale']}, LR by {metrics['degradation']} degradation",
        "- PSNR/SSIM on Y (BT.601), border cropped by the scale; LPIPS AlexNet v0.1; bicubic = PyTorch bicubic (not MATLAB imresize)",
        f"- seconds per image on this machine ({os.cpu_count()} CPUs), guidance {metrics['guidance']}",
    ]
    if metrics["lpips_note"]:
        lines.append(f"- {metrics['lpips_note']}")
    if metrics["bad_pairs"]:
        lines.append(f"- {len(metrics['bad_pairs'])} bad LR/HR pairs skipped: "
                     + "; ".join(f"{b['source']} ({b['error']})" for b in metrics["bad_pairs"]))
    lines += ["", "| variant | PSNR-Y (dB) | Δ vs bicubic | SSIM-Y | LPIPS ↓ | NFE | s / image |", "|---|---|---|---|---|---|---|"]
    for name in [BICUBIC] + [v.name for v in variants]:
        r = s[name]
        delta = r["psnr_y"] - base["psnr_y"]
        lines.append(f"| {name} | {_fmt(r['psnr_y'], '.2f')} | {delta:+.2f} | {_fmt(r['ssim_y'], '.4f')} | "
                     f"{_fmt(r['lpips'])} | {_fmt(r['nfe'], '.0f')} | {_fmt(r['seconds'], '.2f')} |")
    c = metrics["checks"]
    lines += ["", "## Quality bar", "",
              f"- 1-NFE beats bicubic by ≥ 0.5 dB PSNR-Y: **{'PASS' if c['psnr_gain_ok'] else 'FAIL'}** ({c['psnr_gain_1nfe_db']:+.2f} dB)"]
    if "lpips_ok" in c:
        lines.append(f"- multi-step LPIPS below bicubic: **{'PASS' if c['lpips_ok'] else 'FAIL'}** "
                     f"({c['lpips_multistep_minus_bicubic']:+.3f})")
    lines += ["", "## Per image (PSNR-Y dB)", "", "| image | tags | " + " | ".join([BICUBIC] + [v.name for v in variants]) + " |",
              "|---" * (len(variants) + 3) + "|"]
    for stem, r in metrics["per_image"].items():
        cells = [_fmt(r[n]["psnr_y"], ".2f") for n in [BICUBIC] + [v.name for v in variants]]
        lines.append(f"| {stem} | {', '.join(r['_tags']) or '—'} | " + " | ".join(cells) + " |")
    lines += ["", "Crops (bicubic | LinearSR 1-NFE | LinearSR multi-step | HR), 2x nearest zoom:", ""]
    lines += [f"![{stem}](crops/{stem}.png)" for stem in metrics["per_image"]]
    return "\n".join(lines) + "\n"


def upscale_only(bundle: str, lr_dir: str, out_dir: str, steps: int = 10, guidance: float = 1.0, seed: int = 0,
                 max_images: int | None = None, max_tags: int = 4) -> dict:
    """An LR-only folder (real captures, no reference): OUT/sr/<image>.1nfe.png and .<N>step.png,
    and the seconds per image in metrics.json / report.md; no quality metrics."""
    if steps < 2:
        raise ValueError(f"--steps is the multi-step setting and must be >= 2 (1-NFE is always run), got {steps}")
    model = load_bundle(bundle)
    images, _ = load_lr_images(lr_dir, None, model.scale, max_images)
    out = Path(out_dir)
    per_image = {}
    for idx, (stem, _, lr) in enumerate(images):
        tags = model.tagger.predict(lr[None], max_tags=max_tags)[0] if model.tagger is not None else []
        row = {"_tags": tags, "size": [lr.shape[2], lr.shape[1]]}
        for name, n in (("1nfe", 1), (f"{steps}step", steps)):
            start = time.perf_counter()
            res = sample(model, lr[None], [tags], steps=n, guidance=guidance, seed=seed + idx)
            row[name] = {"seconds": time.perf_counter() - start, "nfe": res.nfe}
            save_png(out / "sr" / f"{stem}.{name}.png", res.image[0])
        per_image[stem] = row
    summary = {name: {k: _mean([r[name] for r in per_image.values()], k) for k in ("seconds", "nfe")}
               for name in ("1nfe", f"{steps}step")}
    metrics = {"bundle": bundle, "lr_dir": lr_dir, "scale": model.scale, "steps": steps, "guidance": guidance,
               "seed": seed, "num_images": len(images), "summary": summary, "per_image": per_image}
    write_json(str(out / "metrics.json"), metrics)
    lines = ["# LinearSR on LR-only images", "", f"- bundle: `{bundle}`",
             f"- {len(images)} images from `{lr_dir}`, x{model.scale}; no HR reference, so no quality metrics",
             f"- outputs: `sr/<image>.1nfe.png`, `sr/<image>.{steps}step.png`; seconds on this machine ({os.cpu_count()} CPUs)",
             "", "| variant | NFE | s / image |", "|---|---|---|"]
    lines += [f"| {name} | {r['nfe']:.0f} | {r['seconds']:.2f} |" for name, r in summary.items()]
    write_text_atomic(str(out / "report.md"), "\n".join(lines) + "\n")
    return metrics


def _log_tensorboard(tb_dir: Path, grids: list[tuple[str, np.ndarray]], summary: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    for stem, grid in grids:
        writer.add_image(f"eval/{stem}", grid, 0, dataformats="HWC")
    for name, r in summary.items():
        for key in ("psnr_y", "ssim_y", "lpips"):
            if r[key] is not None:
                writer.add_scalar(f"eval/{key}/{name}", r[key], 0)
    writer.close()


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
                       args.seed, args.max_images, tb=not args.no_tb, lr_dir=args.lr,
                       ablation_guidance=args.ablation_guidance)
    base, one = metrics["summary"][BICUBIC], metrics["summary"]["LinearSR 1-NFE"]
    print(f"bicubic {base['psnr_y']:.2f} dB, LinearSR 1-NFE {one['psnr_y']:.2f} dB "
          f"({one['psnr_y'] - base['psnr_y']:+.2f}) on {metrics['num_images']} images")
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0
