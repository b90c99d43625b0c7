"""`linearsr bench data`: can the CPUs of a GPU node feed base_x4? Every number is per CPU core
(one torch thread), measured in this process on the same photos, so the ratios are fair:

1. degradation: the realistic Real-ESRGAN LR of 512^2 crops, one sample per call vs one call per
   batch of 16 (what a loader worker does with degrade_on = "loader", and the trainer on its device
   with "device"), on this CPU.
2. decode + random crop: the shards' PNGs with Pillow, and the same photos as JPEG q95 with Pillow
   vs libjpeg-turbo (simplejpeg, what the loader uses).
3. supply / demand: base_x4's demand in samples/s per GPU from the step time (the measured
   forward of the base stack at 4,096 tokens x 3 for forward + backward, and docs/gpu.md's 40 % MFU
   target), against what the 4 cores per GPU of a 16-core, 4-GPU node supply, for either degrade_on.
4. the whole training loader, from the local S3 server vs local disk (decode + crop + HR batches).

Other work on the machine moves single rounds, so each figure is the median of --rounds rounds,
and the load average is printed."""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from linearsr.core import storage
from linearsr.data.batches import crop_pair, to_tensor
from linearsr.data.config import DataConfig, DegradationConfig
from linearsr.data.degradations import degrade_batch
from linearsr.data.loader import make_train_loader
from linearsr.data.reader import HR_EXTS, decode_image, iter_samples
from linearsr.data.shards import read_shard_manifest
from linearsr.dev import s3local

# docs/gpu.md "Measured": the base stack's eager bf16 forward at 4,096 tokens (a 512^2 crop) on an H200, batch 1
BASE_FORWARD_MS = 26.8
# docs/gpu.md: base's forward FLOPs at 4,096 tokens = its matmul floor 4.5 ms x 790 TFLOP/s; target 40 % MFU of 989
BASE_FORWARD_TFLOP = 4.5e-3 * 790
MFU_TARGET_TFLOPS = 0.4 * 989
CORES_PER_GPU = 16 / 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default="runs/data/shards", help="local shard root (make data builds runs/data/shards)")
    parser.add_argument("--crop", type=int, default=512, help="HR crop side (base_x4: 512)")
    parser.add_argument("--photos", type=int, default=8, help="photos from the train shards to measure on")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement; the median is reported")
    parser.add_argument("--loader-batches", type=int, default=20, help="timed batches per loader round (0: skip part 4)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of part 4")


def _rate(fn, n: int, rounds: int) -> float:
    """Median items/s of fn() (which handles n items) over rounds, after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def _photos(root: str, n: int) -> list[bytes]:
    out = []
    for sample in iter_samples(root, "train"):
        out.append(sample[next(e for e in HR_EXTS if e in sample)])
        if len(out) == n:
            break
    return out


def _jpeg(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _decode_rate(images: list[bytes], decoder, crop: int, rounds: int) -> float:
    rng = random.Random(0)
    return _rate(lambda: [crop_pair(decoder(b), None, crop, 1, rng) for b in images], len(images), rounds)


def run(args: argparse.Namespace) -> int:
    manifest = read_shard_manifest(args.shards)  # FileNotFoundError names the fix (make data)
    if "://" in args.shards:
        raise ValueError(f"--shards must be a local folder (it is uploaded to the local S3 server), got {args.shards}")
    torch.set_num_threads(1)
    pngs = _photos(args.shards, args.photos)
    jpegs = [_jpeg(b) for b in pngs]
    size = _pillow(pngs[0]).shape
    print(f"{len(pngs)} photos from {args.shards} (e.g. {size[1]}x{size[0]}), {args.crop}^2 crops, 1 torch thread, "
          f"{os.cpu_count()} CPUs, median of {args.rounds} rounds")

    rng = random.Random(0)
    hr = torch.stack([to_tensor(crop_pair(_pillow(pngs[i % len(pngs)]), None, args.crop, 1, rng)[0]) for i in range(16)])
    cfg, seeds = DegradationConfig(), list(range(16))
    one = _rate(lambda: [degrade_batch(hr[i:i + 1], cfg, 4, seeds[i:i + 1]) for i in range(16)], 16, args.rounds)
    batched = _rate(lambda: degrade_batch(hr, cfg, 4, seeds), 16, args.rounds)
    print("\n1. realistic degradation on this CPU          samples/s per core")
    print(f"   one sample per call                          {one:8.2f}")
    print(f"   one call per batch of 16                     {batched:8.2f}   ({batched / one:.2f}x)")

    png = _decode_rate(pngs, _pillow, args.crop, args.rounds)
    jpg_pil = _decode_rate(jpegs, _pillow, args.crop, args.rounds)
    jpg_turbo = _decode_rate(jpegs, decode_image, args.crop, args.rounds)
    print("\n2. decode + random crop                       images/s per core")
    print(f"   PNG (the shards), Pillow                     {png:8.2f}")
    print(f"   JPEG q95, Pillow                             {jpg_pil:8.2f}")
    print(f"   JPEG q95, libjpeg-turbo (simplejpeg)         {jpg_turbo:8.2f}   ({jpg_turbo / jpg_pil:.2f}x Pillow)")

    eager, mfu = 1000 / (3 * BASE_FORWARD_MS), MFU_TARGET_TFLOPS / (3 * BASE_FORWARD_TFLOP)
    supply = {"device, JPEG shards": CORES_PER_GPU * jpg_turbo, "device, PNG shards": CORES_PER_GPU * png,
              "loader, JPEG shards": CORES_PER_GPU / (1 / jpg_turbo + 1 / batched)}  # a worker degrades whole batches
    print(f"\n3. base_x4 (512^2 crops, 1 crop per image): demand per GPU {eager:.1f} samples/s at the documented eager "
          f"step (3 x {BASE_FORWARD_MS} ms forward), {mfu:.1f} at the 40 % MFU target")
    print(f"   supply with {CORES_PER_GPU:.0f} cores per GPU   samples/s   supply/demand: eager   40 % MFU   (goal >= 2)")
    for name, v in supply.items():
        print(f"   degrade_on = {name:20s} {v:8.1f}   {v / eager:19.2f} {v / mfu:10.2f}")
    print("   (device: the CPUs decode and crop; the degradation runs on the GPU and its time is not in the step above)")

    if args.loader_batches:
        _loader_rounds(args, manifest)
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


def _measure(cfg: DataConfig, batches: int) -> float:
    """Samples per second of a fresh training loader, after 4 warm-up batches."""
    loader = make_train_loader(cfg, seed=0)
    try:
        for _ in range(4):
            next(loader)
        start, n = time.perf_counter(), 0
        for _ in range(batches):
            n += len(next(loader)["key"])
        return n / (time.perf_counter() - start)
    finally:
        loader.close()


def _loader_rounds(args: argparse.Namespace, manifest: dict) -> None:
    disk = DataConfig(shards=args.shards, crop=min(args.crop, 256), batch_size=8, num_workers=args.workers,
                      shuffle_buffer=16, degrade_on="device")
    train = manifest["splits"]["train"]
    print(f"\n4. training loader, {args.workers} workers, HR batches of 8 x {disk.crop}^2 (degrade_on = device): "
          f"{train['samples']} samples in {len(train['shards'])} shards, {train['bytes'] / 2**20:.1f} MiB")
    with tempfile.TemporaryDirectory(prefix="linearsr-bench-s3-") as state:
        server = s3local.start(state)
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())  # DataLoader workers inherit it
        try:
            bucket = server.make_bucket("bench")
            storage.s3_filesystem(server.endpoint).put(args.shards, f"{bucket[5:]}/shards", recursive=True)
            remote = dataclasses.replace(disk, shards=f"{bucket}/shards", s3_endpoint=server.endpoint)
            results: dict[str, list[float]] = {"disk": [], "s3": []}
            for _ in range(args.rounds):  # alternating, so machine load hits both
                for name, cfg in (("disk", disk), ("s3", remote)):
                    results[name].append(_measure(cfg, args.loader_batches))
        finally:
            server.stop()
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    mid = {k: statistics.median(v) for k, v in results.items()}
    print(f"   disk {mid['disk']:8.1f} samples/s   s3 {mid['s3']:8.1f} samples/s   S3 / disk = {mid['s3'] / mid['disk']:.2f} "
          f"(target >= 0.80: {'met' if mid['s3'] >= 0.8 * mid['disk'] else 'NOT met'})")
