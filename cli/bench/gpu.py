"""`linearsr bench gpu` (`make bench-gpu`): attention backends, model latency and training MFU.

Three sections, each row guarded (a failing row records its error and the others still run):

- attention: fwd and fwd+bwd time of `linear_attention(q, k, v, backend)` for sdpa / torch / fla /
  fused at 1k..256k tokens (B=1, 16 heads x 64, bf16), peak memory, and the ratio to the HBM floor.
  The floor is the compulsory traffic at the measured copy bandwidth: forward reads q, k, v and
  writes o (4 tensors); backward reads q, k, v, do and writes dq, dk, dv (7 more).
- model: 1-NFE latency (`sample(..., steps=1)`, bf16 autocast) of the `base` model for 512^2,
  1024^2 and 4096^2 outputs for sdpa / torch / fused (`--model-backends`; softmax only up to 1024^2),
  and the ratio of the largest to the next size.
- train: a bf16-autocast AdamW step of `base` (batch 4, 512^2 HR crops): step time, samples/s, and
  MFU = matmul FLOPs (torch.utils.flop_counter, torch-attention model) / time / nominal bf16 peak.

`--device cpu --quick` runs the same code at toy sizes (cpu_tiny, fp32) so the script is tested on
machines without a GPU; fla/fused rows then read "skipped: needs CUDA". Writes JSON, prints a table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

from linearsr.core import storage

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "torch", "fla", "fused")
CUDA_ONLY = ("fla", "fused")
# name fragment -> (dense bf16 TFLOP/s, HBM GB/s), vendor datasheets; first match wins
NOMINAL = [("GH200", 989, 4000), ("H200", 989, 4800), ("H100 PCIe", 756, 2000), ("H100 NVL", 835, 3900),
           ("H100", 989, 3350), ("A100", 312, 2039), ("L40S", 362, 864)]


@dataclasses.dataclass
class Sizes:
    tokens: list[int]
    heads: int
    head_dim: int
    sdpa_max_tokens: int
    preset: str
    out_px: list[int]
    softmax_max_px: int
    train_batch: int
    train_px: int
    max_reps: int  # timed repetitions per measurement, at most


FULL = Sizes([1024, 4096, 16384, 65536, 262144], 16, 64, 65536, "base", [512, 1024, 4096], 1024, 4, 512, 50)
QUICK = Sizes([256, 1024], 2, 16, 1024, "cpu_tiny", [32, 64, 128], 64, 2, 32, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes (cpu_tiny): tests the script itself")
    parser.add_argument("--out", default="runs/bench/gpu.json", help="JSON result file")
    parser.add_argument("--sections", default="attention,model,train", help="comma list of attention,model,train")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="attention backends to compare")
    parser.add_argument("--model-backends", default="sdpa,torch,fused",
                        help="attention backends of the model and train sections (fla adds minutes of autotuning)")
    parser.add_argument("--tokens", default="", help="comma list overriding the attention token counts")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for MFU (default: by GPU name)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(fn, device: torch.device, target_s: float = 0.25, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median wall time of fn() in ms after two warm-up calls (compilation, autotuning);
    CUDA events on a GPU, perf_counter on CPU."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    reps = int(min(max_reps, max(min(min_reps, max_reps), target_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def guarded(row: dict, fn) -> dict:
    """Run fn(row) (which fills row); a ValueError is a skip with its reason, anything else an error."""
    try:
        fn(row)
        row.setdefault("status", "ok")
    except ValueError as e:
        row["status"] = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
        row["status"] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        log.warning("%s failed", row, exc_info=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("%s", row)
    return row


def environment(device: torch.device, peak_override: float) -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next(((tf, bw) for frag, tf, bw in NOMINAL if frag in name), (None, None))
    env = {
        "device": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": version("triton"), "fla": version("fla-core"),
        "cuda": torch.version.cuda, "peak_tflops_bf16": peak_override or nominal[0], "hbm_gbps_nominal": nominal[1],
    }
    numel = 2**28 if device.type == "cuda" else 2**23  # 1 GiB / 32 MiB of fp32
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    env["hbm_gbps_measured"] = 2 * src.nbytes / measure_ms(lambda: dst.copy_(src), device) / 1e6
    return env


def attention_rows(sizes: Sizes, backends: list[str], device: torch.device, dtype: torch.dtype, hbm_gbps: float):
    from linearsr.model.attention import linear_attention

    rows = []
    for num_n in sizes.tokens:
        for backend in backends:
            row = {"backend": backend, "tokens": num_n, "batch": 1, "heads": sizes.heads, "head_dim": sizes.head_dim,
                   "dtype": str(dtype).removeprefix("torch.")}

            def run(row, backend=backend, num_n=num_n):
                if backend in CUDA_ONLY and device.type != "cuda":
                    raise ValueError("needs CUDA")
                if backend == "sdpa" and num_n > sizes.sdpa_max_tokens:
                    raise ValueError(f"softmax is O(N^2): only up to {sizes.sdpa_max_tokens} tokens")
                shape = (1, num_n, sizes.heads, sizes.head_dim)
                q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
                do = torch.randn(shape, device=device, dtype=dtype)

                def fwd():
                    with torch.no_grad():
                        linear_attention(q, k, v, backend=backend)

                def fwd_bwd():
                    torch.autograd.grad(linear_attention(q, k, v, backend=backend), (q, k, v), do)

                row["fwd_ms"] = measure_ms(fwd, device, max_reps=sizes.max_reps)
                row["fwd_bwd_ms"] = measure_ms(fwd_bwd, device, max_reps=sizes.max_reps)
                row["peak_mib"] = peak_mib(fwd_bwd, device)
                tensor_bytes = q.numel() * q.element_size()
                row["floor_fwd_ms"] = 4 * tensor_bytes / hbm_gbps / 1e6
                row["floor_fwd_bwd_ms"] = 11 * tensor_bytes / hbm_gbps / 1e6
                row["x_floor_fwd"] = row["fwd_ms"] / row["floor_fwd_ms"]
                row["x_floor_fwd_bwd"] = row["fwd_bwd_ms"] / row["floor_fwd_bwd_ms"]

            rows.append(guarded(row, run))
    return rows


def _model(sizes: Sizes, attention: str, device: torch.device):
    from linearsr.model.config import ModelConfig
    from linearsr.model.network import LinearSR

    if attention in CUDA_ONLY and device.type != "cuda":
        raise ValueError("needs CUDA")
    cfg = ModelConfig.preset(sizes.preset, attention=attention)
    with torch.device(device):
        return LinearSR(cfg)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def model_rows(sizes: Sizes, backends: list[str], device: torch.device) -> list[dict]:
    from linearsr.model.sampler import sample

    rows = []
    for attention in backends:
        try:
            model = _model(sizes, attention, device).eval()
        except Exception as e:  # noqa: BLE001 - recorded per size below
            model, failure = None, e
        for px in sizes.out_px:
            row = {"attention": attention, "out_px": px, "tokens": None, "dtype": "bf16" if device.type == "cuda" else "fp32"}

            def run(row, px=px):
                if model is None:
                    raise failure
                if attention == "sdpa" and px > sizes.softmax_max_px:
                    raise ValueError(f"softmax model only up to {sizes.softmax_max_px}^2 (O(N^2) in pixels)")
                row["tokens"] = (px // model.multiple) ** 2
                lr = torch.rand(1, 3, px // model.cfg.scale, px // model.cfg.scale, device=device)
                noise = torch.randn(model.encode_condition(lr).shape, device=device)
                tags = [["cat", "grass", "fence"]]

                def nfe():
                    with _autocast(device):
                        sample(model, lr, tags, steps=1, noise=noise)

                row["ms"] = measure_ms(nfe, device, target_s=0.5, min_reps=2, max_reps=min(20, sizes.max_reps))
                row["peak_mib"] = peak_mib(nfe, device)

            rows.append(guarded(row, run))
        model = None  # free it before the next backend
    return rows


def ratio_rows(rows: list[dict], sizes: Sizes) -> list[dict]:
    big, ref = sizes.out_px[-1], sizes.out_px[-2]
    out = []
    for attention in dict.fromkeys(r["attention"] for r in rows):
        ms = {r["out_px"]: r.get("ms") for r in rows if r["attention"] == attention and r["status"] == "ok"}
        if ms.get(big) and ms.get(ref):
            out.append({"attention": attention, "big_px": big, "ref_px": ref, "time_ratio": ms[big] / ms[ref],
                        "pixel_ratio": (big / ref) ** 2})
    return out


def count_flops(model, step_inputs) -> float:
    """Matmul/conv FLOPs of one forward + backward (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    hr, lr, tags, t, device = step_inputs
    with FlopCounterMode(display=False) as counter:
        with _autocast(device):
            loss = model.loss(hr, lr, tags, t).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def train_rows(sizes: Sizes, backends: list[str], device: torch.device, peak_tflops: float | None) -> list[dict]:
    linear = [b for b in ("torch", "fused", "fla") if b in backends]  # torch first: its FLOP count is the model's
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(sizes.train_batch, 3, sizes.train_px, sizes.train_px, generator=gen).to(device)
    t = torch.rand(sizes.train_batch, generator=gen).to(device)
    tags = [["cat", "grass"]] * sizes.train_batch
    rows, model_flops = [], None
    for attention in linear:
        row = {"attention": attention, "batch": sizes.train_batch, "hr_px": sizes.train_px,
               "dtype": "bf16 autocast" if device.type == "cuda" else "fp32"}

        def run(row, attention=attention):
            nonlocal model_flops
            model = _model(sizes, attention, device).train()
            lr = F.interpolate(hr, scale_factor=1 / model.cfg.scale, mode="area")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            flops = count_flops(model, (hr, lr, tags, t, device))
            model_flops = model_flops or flops

            def step():
                with _autocast(device):
                    loss = model.loss(hr, lr, tags, t).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            row["tokens_per_step"] = sizes.train_batch * (sizes.train_px // model.multiple) ** 2
            row["step_ms"] = measure_ms(step, device, target_s=1.0, min_reps=3, max_reps=min(20, sizes.max_reps))
            row["samples_per_s"] = sizes.train_batch / row["step_ms"] * 1e3
            row["tflop_per_step"] = model_flops / 1e12
            row["achieved_tflops"] = model_flops / row["step_ms"] / 1e9
            row["mfu"] = row["achieved_tflops"] / peak_tflops if peak_tflops else None
            row["peak_mib"] = peak_mib(step, device)

        rows.append(guarded(row, run))
    return rows


def targets(result: dict) -> list[dict]:
    """The issue's targets, each with what was measured; met is None where nothing was measured
    (and in --quick mode, whose sizes are not the targets' sizes)."""
    att = {(r["backend"], r["tokens"]): r for r in result.get("attention", []) if r["status"] == "ok"}
    pairs = [(n, r["fwd_bwd_ms"], att[("sdpa", n)]["fwd_bwd_ms"])
             for (b, n), r in att.items() if b == "fused" and n >= 1024 and ("sdpa", n) in att]
    floors = [r["x_floor_fwd_bwd"] for (b, n), r in att.items() if b == "fused" and n >= 65536]
    nfe = [r["ms"] for r in result.get("model", []) if r["status"] == "ok" and r["out_px"] == 1024 and r["attention"] != "sdpa"]
    ratios = [r["time_ratio"] for r in result.get("model_ratio", []) if r["attention"] != "sdpa"]
    mfus = [r["mfu"] for r in result.get("train", []) if r["status"] == "ok" and r.get("mfu") is not None]

    quick = result.get("env", {}).get("quick", False)

    def check(name, measured, ok):
        return {"name": name, "measured": measured, "met": None if quick or measured in (None, []) else bool(ok)}

    return [
        check("fused fwd+bwd faster than flash SDPA at every N >= 1k", pairs, all(f < s for _, f, s in pairs)),
        check("fused fwd+bwd within 3x of the HBM floor at N >= 64k", max(floors, default=None), max(floors, default=0) <= 3),
        check("1-NFE 1024^2 output, base, linear attention <= 15 ms", min(nfe, default=None), min(nfe, default=0) <= 15),
        check("time(4096^2) / time(1024^2) <= 18, linear attention", min(ratios, default=None), min(ratios, default=0) <= 18),
        check("bf16 training step MFU >= 40%, base", max(mfus, default=None), max(mfus, default=0) >= 0.40),
    ]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def print_table(result: dict) -> None:
    for section, rows in result.items():
        if section == "env" or not rows:
            continue
        keys = [k for k in rows[0] if k != "status"] + (["status"] if "status" in rows[0] else [])
        print(f"\n== {section}")
        table = [keys] + [[_fmt(r.get(k)) for k in keys] for r in rows]
        widths = [min(60, max(len(line[i]) for line in table)) for i in range(len(keys))]
        for line in table:
            print("  ".join(cell[:60].ljust(w) for cell, w in zip(line, widths)))


def write_json(path: Path, data: dict) -> None:
    """The results (dtypes, devices and the like as their text), written atomically."""
    storage.write_text_atomic(str(path), json.dumps(data, indent=1, default=str) + "\n")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU; use --device cpu --quick on a CPU machine")
    if device.type != "cuda" and not args.quick:
        raise ValueError("the full benchmark needs a GPU (base model, 256k tokens); on a CPU use --device cpu --quick")
    sizes = dataclasses.replace(QUICK if args.quick else FULL)
    if args.tokens:
        sizes.tokens = [int(n) for n in args.tokens.split(",")]
    sections = args.sections.split(",")
    backends, model_backends = args.backends.split(","), args.model_backends.split(",")
    unknown = sorted(set(sections) - {"attention", "model", "train"}) + sorted(set(backends + model_backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown section/backend {', '.join(unknown)}; sections: attention,model,train; backends: {','.join(BACKENDS)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start, out = time.perf_counter(), Path(args.out)
    result: dict = {"env": environment(device, args.peak_tflops)}
    result["env"]["quick"] = args.quick
    # the file is rewritten after each section, so a run cut short by a time limit keeps what it measured
    if "attention" in sections:
        result["attention"] = attention_rows(sizes, backends, device, dtype, result["env"]["hbm_gbps_measured"])
        write_json(out, result)
    if "model" in sections:
        result["model"] = model_rows(sizes, model_backends, device)
        result["model_ratio"] = ratio_rows(result["model"], sizes)
        write_json(out, result)
    if "train" in sections:
        result["train"] = train_rows(sizes, model_backends, device, result["env"]["peak_tflops_bf16"])
    result["targets"] = targets(result)
    result["env"]["bench_s"] = time.perf_counter() - start
    write_json(out, result)
    print_table(result)
    print(f"\nwrote {args.out} ({result['env']['bench_s']:.0f} s on {result['env']['device']})")
    return 0
