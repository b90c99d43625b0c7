"""Load: the training loader at full speed for a bounded time, 2 DataLoader workers, on the real
photo shards (`make data`; `make test` builds them). Memory stays flat (no leak: the resident
memory of the main process and its workers after warm-up vs at the end) and the throughput holds
(second half vs first half). The bounds are loose on purpose: the machine is shared."""

from __future__ import annotations

import os
import statistics
import time

import psutil
import pytest

from linearsr.data.config import DataConfig
from linearsr.data.loader import make_train_loader

pytestmark = pytest.mark.integration

PHOTO_SHARDS = os.path.join("runs", "data", "shards")
WARMUP_S, MEASURE_S = 8.0, 20.0  # workers reach their plateau (shuffle buffers full, largest photos seen) in ~8 s
WINDOW_S = 5.0  # memory at the start / end: the median of the probes in the first / last 5 s
MAX_GROWTH_MIB = 50.0  # a worker swings +-20 MiB with the photo it decodes; a leak of one 96 px crop per sample
                       # would add ~10 MiB/s


def rss_mib(proc: psutil.Process) -> float:
    """Resident memory of a process and all its children (the DataLoader workers), in MiB."""
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def test_loader_under_sustained_load_keeps_memory_flat_and_throughput_steady(record_property):
    assert os.path.exists(os.path.join(PHOTO_SHARDS, "manifest.json")), \
        f"real photo shards missing at {PHOTO_SHARDS}: `make data` builds them (make test does)"
    # the demo's loader settings (96 px crops, 4 crops per decoded 1280x800 photo, 64-crop shuffle buffers)
    # with the default, realistic degradation (blur, resize, noise, JPEG: the most code per sample)
    cfg = DataConfig(shards=PHOTO_SHARDS, crop=96, batch_size=8, num_workers=2, crops_per_image=4, shuffle_buffer=64,
                     degrade_on="loader")
    me = psutil.Process()
    loader = make_train_loader(cfg, seed=0)
    samples: list[tuple[float, int]] = []  # (time, samples so far) after each batch
    memory: list[tuple[float, float]] = []  # (time, MiB) twice a second
    try:
        t0 = time.monotonic()
        next_probe = t0
        while (now := time.monotonic()) < t0 + WARMUP_S + MEASURE_S:
            batch = next(loader)
            assert batch["hr"].shape == (8, 3, 96, 96)
            now = time.monotonic()
            samples.append((now - t0, loader.samples))
            if now >= next_probe:
                memory.append((now - t0, rss_mib(me)))
                next_probe = now + 0.5
        workers = len(me.children(recursive=True))
    finally:
        loader.close()
    assert workers >= 2 and loader.skips == {}

    mem = [(t, m) for t, m in memory if t >= WARMUP_S]
    start = statistics.median(m for t, m in mem if t < WARMUP_S + WINDOW_S)
    end = statistics.median(m for t, m in mem if t >= WARMUP_S + MEASURE_S - WINDOW_S)
    half = WARMUP_S + MEASURE_S / 2

    def rate(lo: float, hi: float) -> float:
        window = [(t, n) for t, n in samples if lo <= t <= hi]
        return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])

    first, second = rate(WARMUP_S, half), rate(half, WARMUP_S + MEASURE_S)
    for name, value in (("rss_start_mib", start), ("rss_end_mib", end), ("samples_per_s_first_half", first),
                        ("samples_per_s_second_half", second)):
        record_property(name, round(value, 1))
    print(f"loader load: RSS {start:.0f} -> {end:.0f} MiB (main + {workers} workers), "
          f"{first:.1f} -> {second:.1f} samples/s, {loader.samples} samples in {WARMUP_S + MEASURE_S:.0f} s")
    assert end - start < MAX_GROWTH_MIB, f"memory grew {end - start:.0f} MiB in {MEASURE_S:.0f} s: {mem[::4]}"
    assert second >= 0.5 * first, f"throughput fell from {first:.1f} to {second:.1f} samples/s"
