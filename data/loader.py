"""Training and validation loaders over the shards of one shard root.

    make_train_loader(cfg, rank, world_size, seed)  endless, resampled, shuffled, random crops
    make_val_loader(cfg, rank, world_size)          finite, deterministic, each sample read once

Batches: {"lr": [B, 3, c/s, c/s], "hr": [B, 3, c, c] float32 in [0, 1], "tags": list[list[str]],
"key": list[str]}. Decoding, cropping and degradation run in the DataLoader workers.

Splitting: train shards go to ranks like `wds.split_by_node` (shard i to rank i % world_size),
then to workers like `wds.split_by_worker`; each worker resamples its own shards with replacement
(seeded by (seed, rank, worker), so a resumed run with a new seed sees a new stream). With fewer
shards than readers every reader resamples all shards. Validation hands each (rank, worker) one
contiguous run of the val samples in manifest order: every sample exactly once, balanced.

Faults (see linearsr.data.reader) are counted per worker; each batch carries its worker's
counters back to the main process, where `.skips` sums them. `DataQualityError` is raised when
skipped / read passes `max_skip_fraction` once `skip_check_after` samples were read.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from linearsr.data import s3
from linearsr.data.config import DataConfig
from linearsr.data.degradations import degrade
from linearsr.data.reader import Stats, decode, read_shard
from linearsr.data.shards import read_manifest, shard_list, stable_hash

log = logging.getLogger(__name__)


class DataQualityError(ValueError):
    """Too many samples were skipped: the data (or the storage) is broken, training would be biased."""


def crop_array(arr: np.ndarray, size: int, rng: random.Random | None) -> np.ndarray:
    """A size x size crop of arr [H, W, 3] (a copy, so it does not pin the whole image): random if
    rng is given, else centred. Images smaller than the crop are mirror-padded first."""
    h, w = arr.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        arr = np.pad(arr, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="symmetric")
        h, w = arr.shape[:2]
    y = rng.randrange(h - size + 1) if rng else (h - size) // 2
    x = rng.randrange(w - size + 1) if rng else (w - size) // 2
    return arr[y:y + size, x:x + size].copy()


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def _batch(items: list[tuple], stats: Stats) -> dict:
    hr, lr, tags, keys = zip(*items)
    return {"lr": torch.stack(lr), "hr": torch.stack(hr), "tags": list(tags), "key": list(keys), "_stats": stats.snapshot()}


class ShardStream(IterableDataset):
    """The per-worker sample pipeline; yields collated batches (plus stats-only heartbeats)."""

    def __init__(self, cfg: DataConfig, shards: list[tuple[str, int]], split: str, rank: int, world_size: int, seed: int):
        self.cfg, self.shards, self.split = cfg, shards, split
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def _read(self, url: str, expected: int, stats: Stats, window=None, opener=None):
        return read_shard(url, expected, stats, window, self.cfg.s3_endpoint, self.cfg.retries, opener)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        stats = Stats(wid)
        items = self._train(stats, wid, nw) if self.split == "train" else self._val(stats, wid, nw)
        yield from items
        yield {"_stats": stats.snapshot()}

    # ----------------------------------------------------------------- training

    def _train_crops(self, stats: Stats, rng: random.Random, shards: list[tuple[str, int]]) -> Iterator:
        cfg, tried, reads = self.cfg, set(), 0
        # the next shard is opened (and, on S3, starts downloading) while this one is decoded
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-open")
        def open_next():
            url, expected = rng.choice(shards)
            return url, expected, pool.submit(s3.open_url, url, cfg.s3_endpoint, cfg.retries)

        nxt = open_next()
        try:
            while True:
                (url, expected, future), nxt = nxt, open_next()
                got = 0
                for sample in self._read(url, expected, stats, opener=future.result):
                    decoded = decode(sample, stats, cfg.max_tags)
                    if decoded is not None:
                        got += 1
                        for _ in range(cfg.crops_per_image):
                            yield crop_array(decoded[0], cfg.crop, rng), decoded[1], sample["__key__"]
                if not got:
                    yield None  # nothing usable in this shard: let the main process see the skips
                tried.add(url)
                reads += 1
                if stats.decoded == 0 and len(tried) == len(shards) and reads >= 3 * len(shards):
                    raise DataQualityError(f"none of the {len(shards)} train shards of worker {stats.worker} (rank "
                                           f"{self.rank}) under {cfg.shards} gave a readable sample; check the shards and the storage")
        finally:
            future = nxt[2]
            if not future.cancel() and future.exception() is None:
                future.result().close()
            pool.shutdown(wait=False)

    def _train(self, stats: Stats, wid: int, nw: int) -> Iterator[dict]:
        cfg = self.cfg
        by_rank = self.shards[self.rank::self.world_size] or self.shards
        mine = by_rank[wid::nw] or by_rank
        rng = random.Random(stable_hash("train", self.seed, self.rank, wid))
        buffer: list = []
        batch: list = []
        for item in self._train_crops(stats, rng, mine):
            if item is None:
                yield {"_stats": stats.snapshot()}
                continue
            buffer.append(item)
            # the buffer grows by one per emitted crop up to shuffle_buffer (as wds.shuffle does),
            # so the first batch does not wait for a full buffer of decoded photos
            if len(buffer) <= min(cfg.shuffle_buffer, cfg.batch_size + stats.samples):
                continue
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            arr, tags, key = buffer.pop()
            if cfg.augment:
                arr = np.rot90(arr[:, ::-1] if rng.random() < 0.5 else arr, k=rng.randrange(4))
            hr = to_tensor(arr)
            batch.append((hr, degrade(hr, cfg.degradation, cfg.scale, rng.getrandbits(63)), tags, key))
            stats.samples += 1
            if len(batch) == cfg.batch_size:
                yield _batch(batch, stats)
                batch = []

    # ----------------------------------------------------------------- validation

    def _val_window(self, wid: int, nw: int) -> tuple[int, int]:
        total = sum(n for _, n in self.shards)
        if self.cfg.val_max_samples is not None:
            total = min(total, self.cfg.val_max_samples)
        k, parts = self.rank * nw + wid, self.world_size * nw
        return total * k // parts, total * (k + 1) // parts

    def _val(self, stats: Stats, wid: int, nw: int) -> Iterator[dict]:
        cfg = self.cfg
        lo, hi = self._val_window(wid, nw)
        batch: list = []
        offset = 0
        for url, expected in self.shards:
            a, b = max(lo - offset, 0), min(hi - offset, expected)
            offset += expected
            if a >= b:
                continue
            for sample in self._read(url, expected, stats, (a, b)):
                decoded = decode(sample, stats, cfg.max_tags)
                if decoded is None:
                    continue
                key = sample["__key__"]
                hr = to_tensor(crop_array(decoded[0], cfg.val_crop, None))
                seed = stable_hash("val", cfg.val_seed, key) >> 1
                batch.append((hr, degrade(hr, cfg.degradation, cfg.scale, seed), decoded[1], key))
                stats.samples += 1
                if len(batch) == (cfg.val_batch_size or cfg.batch_size):
                    yield _batch(batch, stats)
                    batch = []
        if batch:
            yield _batch(batch, stats)


class _Accounting:
    """Main-process view of the workers' counters: the latest snapshot per worker of the current
    pass, plus the totals of finished passes."""

    def __init__(self, cfg: DataConfig, what: str):
        self.cfg, self.what = cfg, what
        self.done_skips: dict[str, int] = {}
        self.done_read = self.done_retries = 0
        self.live: dict[int, dict] = {}

    def update(self, snap: dict) -> None:
        self.live[snap["worker"]] = snap

    def end_pass(self) -> None:
        for snap in self.live.values():
            for r, n in snap["skips"].items():
                self.done_skips[r] = self.done_skips.get(r, 0) + n
            self.done_read += snap["decoded"] + sum(snap["skips"].values())
            self.done_retries += snap["retries"]
        self.live = {}

    @property
    def skips(self) -> dict[str, int]:
        out = dict(self.done_skips)
        for snap in self.live.values():
            for r, n in snap["skips"].items():
                out[r] = out.get(r, 0) + n
        return out

    @property
    def read(self) -> int:
        """Samples read: decoded or skipped."""
        return self.done_read + sum(s["decoded"] + sum(s["skips"].values()) for s in self.live.values())

    @property
    def retries(self) -> int:
        return self.done_retries + sum(s["retries"] for s in self.live.values())

    def check(self) -> None:
        skips, read = self.skips, self.read
        skipped = sum(skips.values())
        if read >= max(1, self.cfg.skip_check_after) and skipped > self.cfg.max_skip_fraction * read:
            detail = ", ".join(f"{r}: {n}" for r, n in sorted(skips.items()))
            raise DataQualityError(
                f"{self.what} data: {skipped} of {read} samples skipped ({skipped / read:.1%} > "
                f"data.max_skip_fraction={self.cfg.max_skip_fraction}) -- {detail}; see the warnings above for "
                f"which shards/samples of {self.cfg.shards} are broken, rebuild them or raise the bound")


class _Loader:
    def __init__(self, cfg: DataConfig, dataset: ShardStream, what: str, persistent: bool):
        self.cfg, self.dataset = cfg, dataset
        self.accounting = _Accounting(cfg, what)
        self.samples = 0  # samples handed to the caller
        kw = {"prefetch_factor": cfg.prefetch_factor, "persistent_workers": persistent} if cfg.num_workers else {}
        self.dataloader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, **kw)

    @property
    def skips(self) -> dict[str, int]:
        """Samples skipped so far, by reason, summed over workers."""
        return self.accounting.skips

    @property
    def retries(self) -> int:
        """S3 request retries so far, summed over workers."""
        return self.accounting.retries

    def _batches(self) -> Iterator[dict]:
        for item in self.dataloader:
            self.accounting.update(item.pop("_stats"))
            self.accounting.check()
            if "lr" in item:
                self.samples += len(item["key"])
                yield item


class TrainLoader(_Loader):
    """An endless iterator of training batches (iterating twice continues the same stream)."""

    def __init__(self, cfg: DataConfig, dataset: ShardStream):
        super().__init__(cfg, dataset, "training", persistent=False)
        self._it: Iterator[dict] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._batches()
        return next(self._it)

    def close(self) -> None:
        """Stop the worker processes."""
        if self._it is not None:
            self._it.close()
            self._it = None


class ValLoader(_Loader):
    """A finite pass per iteration; this rank's share of the val samples is `num_samples`."""

    def __init__(self, cfg: DataConfig, dataset: ShardStream):
        super().__init__(cfg, dataset, "validation", persistent=cfg.num_workers > 0)
        nw = max(1, cfg.num_workers)
        self.num_samples = sum(hi - lo for lo, hi in (dataset._val_window(w, nw) for w in range(nw)))

    def __iter__(self) -> Iterator[dict]:
        self.accounting.end_pass()
        try:
            yield from self._batches()
        finally:
            self.accounting.end_pass()


def _shards(cfg: DataConfig, split: str) -> list[tuple[str, int]]:
    manifest = read_manifest(cfg.shards, cfg.s3_endpoint, cfg.retries)
    shards = shard_list(cfg.shards, manifest, split)
    if not shards:
        raise ValueError(f"shard root {cfg.shards} has no {split} shards; rebuild with "
                         f"{'a larger --val-fraction' if split == 'val' else 'more images'}")
    return shards


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}")


def make_train_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0) -> TrainLoader:
    """Endless training batches for one rank; `.skips`, `.samples`, `.retries` for metrics."""
    _check_rank(rank, world_size)
    shards = _shards(cfg, "train")
    readers = world_size * max(1, cfg.num_workers)
    if len(shards) < readers:
        log.warning("only %d train shards for %d ranks x %d workers: readers share shards (resampled, so no "
                    "sample is favoured); build smaller shards for disjoint reads", len(shards), world_size,
                    max(1, cfg.num_workers))
    return TrainLoader(cfg, ShardStream(cfg, shards, "train", rank, world_size, seed))


def make_val_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> ValLoader:
    """One deterministic pass over this rank's share of the val samples per iteration."""
    _check_rank(rank, world_size)
    return ValLoader(cfg, ShardStream(cfg, _shards(cfg, "val"), "val", rank, world_size, cfg.val_seed))
