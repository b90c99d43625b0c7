"""`linearsr bench attention`: forward+backward time of ReLU linear attention (`torch`) against
softmax attention (`sdpa`) as the token count grows, both in this process, on CPU or GPU.

Prints a table (ms per fwd+bwd, median of --repeats after a warm-up) with the ratio
softmax/linear; `--json` prints the rows as JSON instead."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from linearsr.model.attention import linear_attention


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="256,1024,4096,16384", help="comma-separated token counts")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="torch,sdpa", help="comma-separated; the last one is the ratio's baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def time_fwd_bwd(backend: str, n: int, args: argparse.Namespace) -> float:
    """Median milliseconds of one forward + backward at n tokens."""
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, n, args.heads, args.head_dim)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(args.device, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=gen).to(args.device, dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(args.repeats + 1):
        sync()
        start = time.perf_counter()
        linear_attention(q, k, v, backend=backend).backward(grad)
        sync()
        if i:  # the first run is a warm-up
            times.append((time.perf_counter() - start) * 1e3)
        q.grad = k.grad = v.grad = None
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    try:
        tokens = [int(x) for x in args.tokens.split(",")]
    except ValueError:
        raise ValueError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if len(backends) < 2:
        raise ValueError("--backends needs at least two backends to compare, e.g. torch,sdpa")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    base = backends[-1]
    rows = []
    for n in tokens:
        row = {"tokens": n, **{f"{b}_ms": float(f"{time_fwd_bwd(b, n, args):.4g}") for b in backends}}
        for b in backends[:-1]:
            row[f"{base}/{b}"] = float(f"{row[f'{base}_ms'] / row[f'{b}_ms']:.3g}")
        rows.append(row)
        if not args.json:
            if len(rows) == 1:
                print(f"attention fwd+bwd on {args.device} ({args.dtype}), batch {args.batch}, {args.heads} heads x {args.head_dim}; "
                      f"ms per call, median of {args.repeats}")
                print("  ".join(f"{k:>14}" for k in row))
            print("  ".join(f"{v:>14}" for v in row.values()), flush=True)
    if args.json:
        print(json.dumps({"device": args.device, "dtype": args.dtype, "heads": args.heads, "head_dim": args.head_dim,
                          "batch": args.batch, "rows": rows}, indent=2))
    return 0
