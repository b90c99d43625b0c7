"""`linearsr bench infer` (`make bench-infer`): what upscaling costs, measured the way users run it.

Sections (`--sections`):
- tiling: one 1-NFE `upscale_image` per output size, untiled and exact-tiled (`--tile` LR
  pixels), each in a fresh process: peak memory above the loaded model (CPU: the process's peak
  RSS; GPU: torch's peak allocation), median time, and the largest difference between the two
  images (exact tiling must give the untiled one).
- scaling: 1-NFE time vs output size for the model with linear attention and the same model with
  softmax attention (`sdpa`, up to `--sdpa-max`), and time(4x pixels) / time(pixels) per step.
- latent: needs CUDA (or --quick): the latent preset (configs/base_x4_latent.toml: DC-AE f32c32,
  randomly initialised, the published architecture) 1-NFE at a 1024^2 output, bf16, end to end
  (encode + network + decode) and the network alone, beside the pixel `base` model.

A measurement whose first run takes over 20 s is that one run; otherwise the median of
--repeats after a warm-up. `--quick` runs every section at toy sizes (tests the script)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from linearsr.model.config import ModelConfig
from linearsr.model.network import LinearSR
from linearsr.model.sampler import sample
from linearsr.model.tiling import upscale_image

LATENT_PRESET = Path(__file__).resolve().parent.parent / "configs" / "base_x4_latent.toml"
SECTIONS = ("tiling", "scaling", "latent")
SINGLE_RUN_S = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sections", default="tiling,scaling,latent", help="comma list of " + ",".join(SECTIONS))
    parser.add_argument("--preset", default="cpu_tiny", help="model preset of the tiling and scaling sections")
    parser.add_argument("--tiling-px", default="512,1024,2048", help="output sides of the tiling section")
    parser.add_argument("--tile", type=int, default=64, help="LR tile side of the exact-tiled runs (default 64)")
    parser.add_argument("--scaling-px", default="256,512,1024,2048", help="output sides of the scaling section")
    parser.add_argument("--sdpa-max", type=int, default=1024, help="largest output side timed with softmax attention")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes: tests the script itself")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # one tiling measurement, in a fresh process


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_s(fn, repeats: int, device: str) -> tuple[float, int]:
    """(seconds, timed runs): the first run alone when it takes over SINGLE_RUN_S, else the
    median of `repeats` runs after it."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    if first > SINGLE_RUN_S:
        return first, 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), repeats


def _model(preset: str, device: str, quick: bool, **overrides) -> LinearSR:
    cfg = ModelConfig.preset(preset, **({"width": 16, "depth": 2} if quick else {}), **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = LinearSR(cfg)
    with torch.no_grad():  # no zero-initialised gates or head: tiled and untiled must agree on a model that uses context
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def _lr(px: int, scale: int, device: str) -> torch.Tensor:
    return torch.rand(3, px // scale, px // scale, generator=torch.Generator().manual_seed(0)).to(device)


# --------------------------------------------------------------------------- tiling (one process per row)


def tiling_child(spec: dict) -> dict:
    """One row: build the model, upscale once to find the peak memory, then time it."""
    device = spec["device"]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model = _model(spec["preset"], device, spec["quick"])
    lr = _lr(spec["px"], model.cfg.scale, device)
    tile = spec["tile"] if spec["mode"] == "exact" else None

    def run():
        return upscale_image(model, lr, tile=tile, tile_mode="exact")

    warm = max(model.multiple, min(64, spec["px"] // 4) // model.multiple * model.multiple)
    upscale_image(model, _lr(warm, model.cfg.scale, device), tile=None)  # warm the allocator and thread pool
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    np.save(spec["out"], out.numpy())
    seconds, runs = time_s(run, spec["repeats"], device)
    return {"peak_mib": peak / 2**20, "seconds": seconds, "runs": runs}


def tiling_rows(args, sizes: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="linearsr-bench-infer-") as tmp:
        for px in sizes:
            images = {}
            for mode in ("untiled", "exact"):
                spec = {"px": px, "mode": mode, "tile": args.tile, "preset": args.preset, "device": args.device,
                        "quick": args.quick, "threads": args.threads, "repeats": args.repeats,
                        "out": os.path.join(tmp, f"{mode}.npy")}
                cmd = [sys.executable, "-m", "linearsr", "bench", "infer", "--child", json.dumps(spec)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"bench child {mode} {px}^2 failed: {proc.stderr.strip()[-500:]}")
                row = {"out_px": px, "mode": mode if mode == "untiled" else f"exact, tile {args.tile}",
                       **json.loads(proc.stdout.strip().splitlines()[-1])}
                images[mode] = np.load(spec["out"])
                rows.append(row)
            rows[-1]["max_abs_diff"] = float(np.abs(images["exact"] - images["untiled"]).max())
            rows[-1]["peak_ratio"] = rows[-1]["peak_mib"] / max(rows[-2]["peak_mib"], 1e-9)
            rows[-1]["time_ratio"] = rows[-1]["seconds"] / rows[-2]["seconds"]
            print_row(rows[-2])
            print_row(rows[-1])
    return rows


# --------------------------------------------------------------------------- scaling


def scaling_rows(args, sizes: list[int]) -> list[dict]:
    rows = []
    for attention in ("torch", "sdpa"):
        model = _model(args.preset, args.device, args.quick, attention=attention)
        previous = None
        for px in sizes:
            if attention == "sdpa" and px > args.sdpa_max:
                break
            lr = _lr(px, model.cfg.scale, args.device)[None]
            seconds, runs = time_s(lambda: sample(model, lr, steps=1), args.repeats, args.device)
            row = {"attention": "linear" if attention == "torch" else "softmax (sdpa)", "out_px": px,
                   "tokens": (px // model.multiple) ** 2, "seconds": seconds, "runs": runs}
            if previous and px == 2 * previous["out_px"]:
                row["time_vs_quarter_pixels"] = seconds / previous["seconds"]
            rows.append(row)
            print_row(row)
            previous = row
    return rows


# --------------------------------------------------------------------------- latent preset (GPU)


def latent_rows(args) -> list[dict]:
    """The latent preset's 1-NFE at a 1024^2 output (end to end and network only) beside the
    pixel `base` model, bf16 on the GPU; toy sizes and fp32 with --quick."""
    try:
        from diffusers import AutoencoderDC
    except ImportError:
        print("  skipped: diffusers is not installed here (the [latent] extra; on the GPU machine see docs/gpu.md)")
        return []
    from linearsr.model.autoencoder import DC_AE_F32C32, TINY_DC_AE, LatentAutoencoder

    device, px = args.device, 128 if args.quick else 1024
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    latent_cfg = ModelConfig.from_dict(tomllib.loads(LATENT_PRESET.read_text())["model"])
    if args.quick:
        latent_cfg = dataclasses.replace(latent_cfg, width=16, depth=2, heads=2, max_tags=8)
    torch.manual_seed(0)
    with torch.device(device):
        ae = LatentAutoencoder(AutoencoderDC(**(TINY_DC_AE if args.quick else DC_AE_F32C32)))
        models = {"latent (DC-AE f32c32, patch 1)": LinearSR(latent_cfg, ae=ae),
                  "pixel (base_x4: unshuffle 4, patch 2)": _model("cpu_tiny" if args.quick else "base", device, args.quick)}
    rows = []
    for name, model in models.items():
        model = model.to(dtype).eval()
        lr = _lr(px, model.cfg.scale, device)[None]
        cond = model.encode_condition(lr)
        t = torch.ones(1, device=device)
        end_to_end = time_s(lambda: sample(model, lr, steps=1), args.repeats, device)[0]
        network = time_s(lambda: model(cond, t, cond, [[]]), args.repeats, device)[0]
        rows.append({"model": name, "out_px": px, "tokens": (px // model.multiple) ** 2, "dtype": str(dtype)[6:],
                     "end_to_end_ms": end_to_end * 1e3, "network_ms": network * 1e3})
        print_row(rows[-1])
    return rows


# --------------------------------------------------------------------------- printing


def print_row(row: dict) -> None:
    print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(tiling_child(json.loads(args.child))))
        return 0
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    tiling_px, scaling_px = _ints(args.tiling_px, "--tiling-px"), _ints(args.scaling_px, "--scaling-px")
    if args.quick:
        tiling_px, scaling_px, args.tile, args.sdpa_max = [64], [32, 64, 128], 8, 64
    where = f"{args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else f'{os.cpu_count()} cores'}" \
            f", {torch.get_num_threads()} torch threads)"
    print(f"linearsr bench infer: model {args.preset}{' (quick: toy sizes)' if args.quick else ''} on {where}")
    result: dict = {"device": where, "preset": args.preset}
    if "tiling" in sections:
        print("\n== tiling: 1-NFE, untiled vs exact-tiled; peak memory above the loaded model")
        result["tiling"] = tiling_rows(args, tiling_px)
    if "scaling" in sections:
        print("\n== scaling: 1-NFE time vs output size; time_vs_quarter_pixels = time(4x pixels) / time(pixels)")
        result["scaling"] = scaling_rows(args, scaling_px)
    if "latent" in sections:
        if args.device.startswith("cuda") or args.quick:
            print(f"\n== latent preset: 1-NFE at a {128 if args.quick else 1024}^2 output, the DC-AE with random weights "
                  "(timing only)")
            result["latent"] = latent_rows(args)
        else:
            print("\n== latent preset: skipped (needs CUDA; run `make bench-infer` on the GPU machine, docs/gpu.md)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
