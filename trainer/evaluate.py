"""`linearsr eval`: a bundle against bicubic (and what users run) on a folder of HR photos, with
ablations and pictures.

For every HR image: modcrop to the scale, make the LR (bicubic x s, or the seeded realistic
degradation), upscale with each variant, and measure PSNR-Y / SSIM-Y (border = scale), LPIPS
(AlexNet and VGG16, v0.1) and DISTS; a perceptual metric whose weights are absent is skipped with
a note, never faked. Variants (rows; `variants()` lists them, add rows there):

    bicubic                       the baseline, always, same images, same run
    Real-ESRGAN x4plus            with --baseline realesrgan (trainer/peers.py); a note when it cannot run
    <bundle> 1-NFE / N steps      the MoE bundle, tags from its tagger (or none)
    <bundle> 1-NFE / N, no tags / shuffled tags / CFG <s>   the TAG ablation (with a tagger): no tags,
                                  another image's tags, classifier-free guidance at scale s
    <name>   1-NFE / N steps      every --compare NAME=BUNDLE (e.g. the knee model alone)

Writes OUT/metrics.json, OUT/report.md, OUT/crops/<image>.png (bicubic | peers | 1-NFE | N-step |
HR) and the same grid to TensorBoard under OUT/tb. Each variant's route (which expert ran at which
t) is logged and reported; `every_expert_steps(bundle)` is the fewest steps >= 10 at which an
N-step sample runs every expert of a bundle at least once."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from linearsr.core.storage import write_json, write_text_atomic
from linearsr.core.util import IMAGE_EXTENSIONS
from linearsr.data.config import DegradationConfig
from linearsr.data.degradations import degrade
from linearsr.data.degrade import bicubic_down, modcrop
from linearsr.model.bundle import load_bundle
from linearsr.model.imageio import save_png
from linearsr.model.sampler import MoE, sample
from linearsr.trainer.peers import PeerUnavailable, load_peer
from linearsr.trainer.quality import DISTS, LPIPS, psnr_y, ssim_y

log = logging.getLogger(__name__)

BICUBIC = "bicubic"


PERCEPTUAL = {"lpips": "LPIPS-alex", "lpips_vgg": "LPIPS-vgg", "dists": "DISTS"}  # lower is better
KEYS = ("psnr_y", "ssim_y", *PERCEPTUAL, "seconds", "nfe")


@dataclass(frozen=True)
class Variant:
    """One row: a LinearSR bundle (`model`: a key into the loaded bundles, sampled with `steps`)
    or a baseline (`baseline`: "bicubic" or a peer of trainer/peers.py)."""

    name: str
    model: str | None = None
    steps: int = 1
    use_tags: bool = True
    baseline: str | None = None
    shuffled: bool = False  # the tags of another image (wrong tags)
    guidance: float | None = None  # None: the evaluation's --guidance


def variants(steps: int, has_tagger: bool, compare: list[str], peers: dict[str, object],
             ablation_guidance: float = 3.0) -> list[Variant]:
    rows = [Variant(BICUBIC, baseline="bicubic")] + [Variant(p.name, baseline=key) for key, p in peers.items()]
    rows += [Variant("LinearSR 1-NFE", "bundle", 1), Variant(f"LinearSR {steps}-step", "bundle", steps)]
    if has_tagger:  # the TAG ablation: no tags, another image's tags, stronger classifier-free guidance
        for n, label in ((1, "1-NFE"), (steps, f"{steps}-step")):
            rows += [Variant(f"LinearSR {label}, no tags", "bundle", n, use_tags=False),
                     Variant(f"LinearSR {label}, shuffled tags", "bundle", n, shuffled=True),
                     Variant(f"LinearSR {label}, CFG {ablation_guidance:g}", "bundle", n, guidance=ablation_guidance)]
    for name in compare:
        rows += [Variant(f"{name} 1-NFE", name, 1), Variant(f"{name} {steps}-step", name, steps)]
    return rows


def load_perceptual() -> tuple[dict[str, torch.nn.Module], list[str]]:
    """The perceptual metrics whose weights are here, and a note for each that is not."""
    loaders = {"lpips": LPIPS.load, "lpips_vgg": lambda: LPIPS.load(net="vgg"), "dists": DISTS.load}
    metrics, notes = {}, []
    for key, load in loaders.items():
        try:
            metrics[key] = load()
        except FileNotFoundError as e:
            notes.append(f"{PERCEPTUAL[key]} skipped: {e}")
            log.warning(notes[-1])
    return metrics, notes


def every_expert_steps(bundle: str, at_least: int = 10) -> int:
    """The fewest Euler steps >= at_least whose grid (the bundle's training shift) visits every
    expert's log-SNR interval, so an N-step row measures all of them."""
    from linearsr.model.flow import covering_steps

    moe = load_bundle(bundle)
    return covering_steps(moe.intervals, moe.shift, at_least=at_least)


def route_text(route: list[tuple[float, float, int]], num_experts: int) -> str:
    """'t 1.00 -> e0, t 0.96 -> e0, ...; experts run: 0, 1, 2, 3 of 4'."""
    steps = ", ".join(f"t {t:.2f} -> e{i}" for t, _, i in route)
    return f"{steps}; experts run: {', '.join(str(i) for i in sorted({i for _, _, i in route}))} of {num_experts}"


def load_hr_images(folder: str, max_images: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """(stem, [3, H, W] float in [0, 1]) for every image in the folder, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"HR folder {folder} does not exist; `make devset` writes the development set to runs/data/devset")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"HR folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
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
        return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)

    lrs = listing(lr_dir)
    if not lrs:
        raise ValueError(f"LR folder {lr_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
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


@torch.no_grad()
def _measure(sr: torch.Tensor, hr: torch.Tensor, scale: int, perceptual: dict, refs: dict) -> dict:
    """refs: each perceptual metric's features of hr (computed once per image)."""
    m = {"psnr_y": psnr_y(sr, hr, border=scale), "ssim_y": ssim_y(sr, hr, border=scale)}
    for key, metric in perceptual.items():
        m[key] = float(metric.score(sr[None], refs[key]).item())
    return m


def _upscale(v: Variant, models: dict[str, MoE], peers: dict, lr, tags, guidance: float, seed: int):
    """(image [3, H, W], network evaluations or None for a peer, the MoE route or None)."""
    if v.baseline == BICUBIC:
        return bicubic_up(lr, models["bundle"].scale), 0, None
    if v.baseline:
        return peers[v.baseline](lr), None, None
    res = sample(models[v.model], lr[None], [tags if v.use_tags else []], steps=v.steps,
                 guidance=guidance if v.guidance is None else v.guidance, seed=seed)
    return res.image[0], res.nfe, res.route


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
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
    baselines: tuple[str, ...] = (),
    ablation_guidance: float = 3.0,
) -> dict:
    """Run the evaluation and write metrics.json, report.md and crops; returns the metrics dict.
    With `lr_dir` the LR images are real ones from that folder, paired with `hr_dir` by name.
    baselines: peers to add as rows (trainer/peers.py: "realesrgan"); one that cannot run here
    is a note in the report instead of a row."""
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
    notes, peers = [], {}
    for key in baselines:
        try:
            peers[key] = load_peer(key, scale)
        except PeerUnavailable as e:
            notes.append(str(e))
            log.warning(notes[-1])
    tagger = models["bundle"].tagger
    rows = variants(steps, tagger is not None, list(compare or {}), peers, ablation_guidance)
    perceptual, skipped = load_perceptual()
    notes += skipped

    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    if lr_dir is not None:  # real LR/HR pairs
        images, bad_pairs = load_lr_images(lr_dir, hr_dir, scale, max_images)
        degradation = "real"
    else:
        images, bad_pairs = [(stem, modcrop(hr, scale), None) for stem, hr in load_hr_images(hr_dir, max_images)], []
    panels = [v.name for v in rows if v.baseline] + ["LinearSR 1-NFE", f"LinearSR {steps}-step"]
    per_image: dict[str, dict[str, dict]] = {}
    routes: dict[str, str] = {}
    grids = []
    lrs = [real_lr if real_lr is not None else make_lr(hr, scale, degradation, seed + idx)
           for idx, (_, hr, real_lr) in enumerate(images)]
    image_tags = [tagger.predict(lr[None], max_tags=max_tags)[0] if tagger is not None else [] for lr in lrs]
    for idx, (stem, hr, _) in enumerate(images):
        lr, tags = lrs[idx], image_tags[idx]
        wrong = _wrong_tags(image_tags, idx, tagger, max_tags)
        with torch.no_grad():
            refs = {key: metric.prepare(hr[None]) for key, metric in perceptual.items()}
        results, outputs = {}, {}
        for v in rows:
            start = time.perf_counter()
            outputs[v.name], nfe, route = _upscale(v, models, peers, lr, wrong if v.shuffled else tags, guidance, seed + idx)
            seconds = time.perf_counter() - start if v.baseline != BICUBIC else 0.0
            results[v.name] = {**_measure(outputs[v.name], hr, scale, perceptual, refs), "seconds": seconds, "nfe": nfe}
            if route is not None and v.name not in routes:  # every image takes the same route: t alone picks the expert
                routes[v.name] = route_text(route, len(models[v.model].experts))
                log.info("route of %s: %s", v.name, routes[v.name])
        results["_tags"] = tags
        per_image[stem] = results
        grid = side_by_side([outputs[name] for name in panels] + [hr], hr)
        Image.fromarray(grid).save(out / "crops" / f"{stem}.png")
        grids.append((stem, grid))
        log.info("eval %d/%d %s: bicubic %.2f dB, LinearSR 1-NFE %.2f dB", idx + 1, len(images), stem,
                 results[BICUBIC]["psnr_y"], results["LinearSR 1-NFE"]["psnr_y"])

    summary = {}
    for v in rows:
        measured = [per_image[s][v.name] for s in per_image]
        summary[v.name] = {k: _mean(measured, k) for k in KEYS}
    metrics = {
        "bundle": bundle, "hr_dir": hr_dir, "degradation": degradation, "scale": scale, "steps": steps,
        "guidance": guidance, "seed": seed, "num_images": len(images), "notes": notes, "panels": panels + ["HR"],
        "lr_dir": lr_dir, "bad_pairs": bad_pairs, "routes": routes,
        "summary": summary, "per_image": per_image, "checks": _quality_checks(summary, steps, peers),
    }
    write_json(str(out / "metrics.json"), metrics)
    write_text_atomic(str(out / "report.md"), render_report(metrics, rows))
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


def _quality_checks(summary: dict, steps: int, peers: dict) -> dict:
    """The bar the demo is held to: +0.5 dB PSNR-Y at 1-NFE, lower LPIPS than bicubic multi-step;
    and where LinearSR stands against each peer (differences, no bar)."""
    base, one, multi = summary[BICUBIC], summary["LinearSR 1-NFE"], summary[f"LinearSR {steps}-step"]
    checks = {"psnr_gain_1nfe_db": one["psnr_y"] - base["psnr_y"]}
    checks["psnr_gain_ok"] = checks["psnr_gain_1nfe_db"] >= 0.5
    if base["lpips"] is not None:
        checks["lpips_multistep_minus_bicubic"] = multi["lpips"] - base["lpips"]
        checks["lpips_ok"] = multi["lpips"] < base["lpips"]
    for peer in peers.values():
        ref = summary[peer.name]
        checks[f"vs {peer.name}"] = {
            name: {k: (row[k] - ref[k] if row[k] is not None and ref[k] is not None else None)
                   for k in ("psnr_y", "ssim_y", *PERCEPTUAL)}
            for name, row in (("LinearSR 1-NFE", one), (f"LinearSR {steps}-step", multi))}
    return checks


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def render_report(metrics: dict, rows: list[Variant]) -> str:
    s = metrics["summary"]
    base = s[BICUBIC]
    lines = [
        "# LinearSR evaluation", "",
        f"- bundle: `{metrics['bundle']}`",
        f"- images: {metrics['num_images']} from `{metrics['hr_dir']}`, x{metrics['scale']}, LR by {metrics['degradation']} degradation",
        "- PSNR/SSIM on Y (BT.601), border cropped by the scale; LPIPS v0.1 (AlexNet, VGG16) and DISTS on RGB, lower "
        "is better; bicubic = PyTorch bicubic (not MATLAB imresize)",
        f"- seconds per image on this machine ({os.cpu_count()} CPUs), guidance {metrics['guidance']}",
    ]
    lines += [f"- {note}" for note in metrics["notes"]]
    if metrics["bad_pairs"]:
        lines.append(f"- {len(metrics['bad_pairs'])} bad LR/HR pairs skipped: "
                     + "; ".join(f"{b['source']} ({b['error']})" for b in metrics["bad_pairs"]))
    lines += ["", "| variant | PSNR-Y (dB) | Δ vs bicubic | SSIM-Y | " + " | ".join(f"{v} ↓" for v in PERCEPTUAL.values())
              + " | NFE | s / image |", "|---" * (6 + len(PERCEPTUAL)) + "|"]
    for v in rows:
        r = s[v.name]
        cells = [_fmt(r["psnr_y"], ".2f"), f"{r['psnr_y'] - base['psnr_y']:+.2f}", _fmt(r["ssim_y"], ".4f"),
                 *(_fmt(r[k]) for k in PERCEPTUAL), _fmt(r["nfe"], ".0f"), _fmt(r["seconds"], ".2f")]
        lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    c = metrics["checks"]
    lines += ["", "## Quality bar", "",
              f"- 1-NFE beats bicubic by ≥ 0.5 dB PSNR-Y: **{'PASS' if c['psnr_gain_ok'] else 'FAIL'}** ({c['psnr_gain_1nfe_db']:+.2f} dB)"]
    if "lpips_ok" in c:
        lines.append(f"- multi-step LPIPS below bicubic: **{'PASS' if c['lpips_ok'] else 'FAIL'}** "
                     f"({c['lpips_multistep_minus_bicubic']:+.3f})")
    for key, against in c.items():
        if key.startswith("vs "):
            for name, d in against.items():
                lines.append(f"- {name} {key}: {_fmt(d['psnr_y'], '+.2f')} dB PSNR-Y, "
                             + ", ".join(f"{_fmt(d[k], '+.3f')} {label}" for k, label in PERCEPTUAL.items())
                             + " (negative perceptual = LinearSR closer to HR)")
    lines += ["", "## Routes (which expert ran at each sampler step)", ""]
    lines += [f"- {name}: {route}" for name, route in metrics.get("routes", {}).items()]
    names = [v.name for v in rows]
    lines += ["", "## Per image (PSNR-Y dB)", "", "| image | tags | " + " | ".join(names) + " |",
              "|---" * (len(names) + 2) + "|"]
    for stem, r in metrics["per_image"].items():
        cells = [_fmt(r[n]["psnr_y"], ".2f") for n in names]
        lines.append(f"| {stem} | {', '.join(r['_tags']) or '—'} | " + " | ".join(cells) + " |")
    lines += ["", f"Crops ({' | '.join(metrics['panels'])}), 2x nearest zoom:", ""]
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
        for key in ("psnr_y", "ssim_y", *PERCEPTUAL):
            if r[key] is not None:
                writer.add_scalar(f"eval/{key}/{name}", r[key], 0)
    writer.close()
