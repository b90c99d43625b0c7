"""`linearsr bench data`: training-loader samples/s from the local S3 server vs local disk.

The same shards are read both ways in the same process, with decoding, cropping and degradation
included (the whole worker pipeline). Rounds alternate disk / S3 so machine load hits both;
the median round of each is reported (with the load average, since other work on the machine
moves single rounds by 2x). Target: S3 >= 0.8 x disk."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

from linearsr.data import s3, s3local
from linearsr.data.config import DataConfig, DegradationConfig
from linearsr.data.loader import make_train_loader
from linearsr.data.shards import read_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default="runs/data/shards", help="local shard root (make data builds runs/data/shards)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches first (worker start, shuffle buffer)")
    parser.add_argument("--rounds", type=int, default=3, help="disk/S3 rounds; the median of each is reported")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=16)
    parser.add_argument("--crops-per-image", type=int, default=1, help="random crops per decoded photo")
    parser.add_argument("--mode", choices=["realistic", "bicubic"], default="realistic", help="degradation")


def measure(cfg: DataConfig, batches: int, warmup: int) -> float:
    """Samples per second of a fresh training loader, after `warmup` batches."""
    loader = make_train_loader(cfg, seed=0)
    try:
        for _ in range(warmup):
            next(loader)
        start, n = time.perf_counter(), 0
        for _ in range(batches):
            n += len(next(loader)["key"])
        return n / (time.perf_counter() - start)
    finally:
        loader.close()


def run(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.shards)  # FileNotFoundError names the fix (make data)
    if "://" in args.shards:
        raise ValueError(f"--shards must be a local folder (it is uploaded to the local S3 server), got {args.shards}")
    disk = DataConfig(shards=args.shards, crop=args.crop, batch_size=args.batch_size, num_workers=args.workers,
                      shuffle_buffer=args.shuffle_buffer, crops_per_image=args.crops_per_image,
                      degradation=DegradationConfig(mode=args.mode))
    train = manifest["splits"]["train"]
    print(f"shards: {args.shards} ({train['samples']} train samples, {len(train['shards'])} shards, "
          f"{train['bytes'] / 2**20:.1f} MiB); batch {args.batch_size}, crop {args.crop}, {args.workers} workers, "
          f"{args.crops_per_image} crop(s) per image, degradation {args.mode}")
    with tempfile.TemporaryDirectory(prefix="linearsr-bench-s3-") as state:
        server = s3local.start(state)
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())  # DataLoader workers inherit it
        try:
            bucket = server.make_bucket("bench")
            t = time.perf_counter()
            s3.s3_filesystem(server.endpoint).put(args.shards, f"{bucket[5:]}/shards", recursive=True)
            print(f"uploaded to {bucket}/shards on {server.endpoint} in {time.perf_counter() - t:.1f}s")
            remote = dataclasses.replace(disk, shards=f"{bucket}/shards", s3_endpoint=server.endpoint)
            results: dict[str, list[float]] = {"disk": [], "s3": []}
            for r in range(args.rounds):
                for name, cfg in (("disk", disk), ("s3", remote)):
                    results[name].append(measure(cfg, args.batches, args.warmup))
                    print(f"round {r + 1}: {name:4s} {results[name][-1]:8.1f} samples/s")
        finally:
            server.stop()
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    mid = {k: statistics.median(v) for k, v in results.items()}
    ratio = mid["s3"] / mid["disk"]
    print(f"\n{'source':8s} {'samples/s (median)':>20s}\n{'disk':8s} {mid['disk']:20.1f}\n{'s3':8s} {mid['s3']:20.1f}")
    print(f"S3 / disk = {ratio:.2f}  (target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'}); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0
