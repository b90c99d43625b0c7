"""Training and validation loaders over the shards of one shard root.

    make_train_loader(cfg, rank, world_size, seed, state=None)  endless, resampled, resumable
    make_val_loader(cfg, rank, world_size)                       finite, deterministic, each sample once

Each DataLoader worker runs a webdataset `DataPipeline`: samples (webdataset's tar iterator and
key grouping, with the faults of linearsr.data.reader counted) -> decode (JPEG via libjpeg-turbo)
-> crops -> batches. Train: `stream.TrainStream` (shards resampled from the full list, a resumable
block shuffle); the batches carry HR + seeds to the device (data.degrade_on = "device", finished by
`batches.finish_batch` in the trainer) or are finished in the worker ("loader"). Validation hands each
(rank, worker) one contiguous run of the val samples in manifest order (every sample exactly once,
balanced; webdataset's split_by_node / split_by_worker split whole shards, which is neither) and
always finishes its batches in the worker, with seed = hash(val_seed, key): a sample's LR is the
same every pass, for every rank layout and for either degrade_on.

Faults are counted per worker; each batch carries its worker's counters back to the main process,
where `.skips` sums them (a train worker whose shard draws give nothing readable raises itself).
`DataQualityError` is raised when skipped / read passes `max_skip_fraction` once `skip_check_after` samples were read.

Exact resume: `TrainLoader.state_dict()` is the position of this rank's stream as of the batches
handed out (every worker's stream state and which worker's batch comes next; JSON, no image data).
`make_train_loader(..., state=...)` with the same shards, rank, world size, workers, seed, batch
size, shuffle buffer and crops per image continues the stream bit-identically (DataLoader workers
deliver in strict round-robin order, so the resumed loader's worker 0 takes the place of the worker
whose batch was next); anything else is refused with a ValueError.
"""

from __future__ import annotations

from typing import Iterator

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from linearsr.core.util import stable_hash
from linearsr.data.batches import Item, collate, crop_pair, finish_batch
from linearsr.data.config import DataConfig
from linearsr.data.reader import Stats, decode, read_shard
from linearsr.data.shards import read_shard_manifest, shard_list
from linearsr.data.stream import DataQualityError, TrainStream

STATE_FORMAT = "linearsr-loader/1"
__all__ = ["DataQualityError", "TrainLoader", "ValLoader", "make_train_loader", "make_val_loader"]


def _batched(cfg: DataConfig, stats: Stats, size: int, finish: bool, partial: bool):
    """A pipeline stage: (item, state) -> batches, each with the counters and the stream state after it.
    Only batches travel (no stats-only items between them): DataLoader workers take turns item by
    item, and an extra item would change whose batch comes next after a resume."""
    def stage(source):
        items: list[Item] = []
        state = None
        for item, state in source:
            items.append(item)
            if len(items) == size:
                yield _emit(items, state)
                items = []
        if items and partial:
            yield _emit(items, state)

    def _emit(items, state):
        batch = collate(items, cfg.scale)
        stats.samples += len(items)
        stats.paired += int(batch["real_lr"].sum())
        if finish:
            batch = finish_batch(batch, cfg)
        return {**batch, "_stats": stats.snapshot(), "_state": state}
    return stage


class ShardStream(IterableDataset):
    """The per-worker pipeline; yields collated batches (a finite stream ends with a stats-only item)."""

    def __init__(self, cfg: DataConfig, shards: list[tuple[str, int]], split: str, rank: int, world_size: int,
                 seed: int, start: dict | None = None):
        self.cfg, self.shards, self.split = cfg, shards, split
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start = start or {"next_worker": 0, "workers": {}}

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.split == "train":
            worker = (wid + self.start["next_worker"]) % nw  # the logical worker (see the module doc)
            stats = Stats(worker)
            stream = TrainStream(self.cfg, self.shards, self.seed, self.rank, worker, stats,
                                 self.start["workers"].get(str(worker)))
            pipeline = wds.DataPipeline(stream.items, _batched(self.cfg, stats, self.cfg.batch_size,
                                                               self.cfg.degrade_on == "loader", partial=False))
        else:
            stats = Stats(wid)
            pipeline = wds.DataPipeline(lambda: self._val_items(stats, wid, nw),
                                        _batched(self.cfg, stats, self.cfg.val_batch_size or self.cfg.batch_size,
                                                 finish=True, partial=True))
        for batch in pipeline:
            batch["_worker"] = stats.worker
            yield batch
        yield {"_stats": stats.snapshot(), "_worker": stats.worker}

    def val_window(self, wid: int, nw: int) -> tuple[int, int]:
        total = sum(n for _, n in self.shards)
        if self.cfg.val_max_samples is not None:
            total = min(total, self.cfg.val_max_samples)
        k, parts = self.rank * nw + wid, self.world_size * nw
        return total * k // parts, total * (k + 1) // parts

    def _val_items(self, stats: Stats, wid: int, nw: int) -> Iterator[tuple[Item, None]]:
        cfg = self.cfg
        lo, hi = self.val_window(wid, nw)
        offset = 0
        for url, expected in self.shards:
            a, b = max(lo - offset, 0), min(hi - offset, expected)
            offset += expected
            if a >= b:
                continue
            for sample in read_shard(url, expected, stats, (a, b), cfg.s3_endpoint):
                decoded = decode(sample, stats, cfg.max_tags, cfg.scale)
                if decoded is None:
                    continue
                key = sample["__key__"]
                hr, lr = crop_pair(decoded.hr, decoded.lr, cfg.val_crop, cfg.scale, None)
                yield Item(hr, lr, decoded.tags, key, stable_hash("val", cfg.val_seed, key) >> 1), None


class _Accounting:
    """Main-process view of the workers' counters: the latest snapshot per worker of the current
    pass, plus the totals of finished passes."""

    def __init__(self, cfg: DataConfig, what: str):
        self.cfg, self.what = cfg, what
        self.done_skips: dict[str, int] = {}
        self.done_read = self.done_retries = self.done_paired = 0
        self.live: dict[int, dict] = {}

    def update(self, snap: dict) -> None:
        self.live[snap["worker"]] = snap

    def end_pass(self) -> None:
        for snap in self.live.values():
            for r, n in snap["skips"].items():
                self.done_skips[r] = self.done_skips.get(r, 0) + n
            self.done_read += snap["decoded"] + sum(snap["skips"].values())
            self.done_retries += snap["retries"]
            self.done_paired += snap["paired"]
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

    @property
    def paired(self) -> int:
        return self.done_paired + sum(s["paired"] for s in self.live.values())

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

    @property
    def paired(self) -> int:
        """Samples delivered with a real LR (paired shards) instead of a synthetic one."""
        return self.accounting.paired

    def _items(self) -> Iterator[dict]:
        for item in self.dataloader:
            self.accounting.update(item.pop("_stats"))
            self.accounting.check()
            yield item


class TrainLoader(_Loader):
    """An endless iterator of training batches (iterating twice continues the same stream)."""

    def __init__(self, cfg: DataConfig, dataset: ShardStream, identity: dict):
        super().__init__(cfg, dataset, "training", persistent=False)
        self.identity = identity
        self.num_workers = max(1, cfg.num_workers)
        self.next_worker = dataset.start["next_worker"]
        self.workers = dict(dataset.start["workers"])
        self._it: Iterator[dict] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._items()
        while True:
            item = next(self._it)
            worker = item.pop("_worker")
            state = item.pop("_state", None)
            if state is not None:  # the final stats-only item of a stream that ended has none
                self.workers[str(worker)] = state
                self.next_worker = (worker + 1) % self.num_workers
            if "hr" in item:
                self.samples += len(item["key"])
                return item

    def state_dict(self) -> dict:
        """The position of this rank's stream as of the batches handed out (JSON-serialisable)."""
        return {**self.identity, "next_worker": self.next_worker, "workers": dict(self.workers), "samples": self.samples}

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
        self.num_samples = sum(hi - lo for lo, hi in (dataset.val_window(w, nw) for w in range(nw)))

    def __iter__(self) -> Iterator[dict]:
        self.accounting.end_pass()
        try:
            for item in self._items():
                item.pop("_worker")
                item.pop("_state", None)
                if "hr" in item:
                    self.samples += len(item["key"])
                    yield item
        finally:
            self.accounting.end_pass()


def _shards(cfg: DataConfig, split: str) -> list[tuple[str, int]]:
    manifest = read_shard_manifest(cfg.shards, cfg.s3_endpoint)
    shards = shard_list(cfg.shards, manifest, split)
    if not shards:
        raise ValueError(f"shard root {cfg.shards} has no {split} shards; rebuild with "
                         f"{'a larger --val-fraction' if split == 'val' else 'more images'}")
    pair_scale = manifest["settings"].get("lr_scale")
    if pair_scale is not None and pair_scale != cfg.scale:
        raise ValueError(f"shard root {cfg.shards} holds real LR/HR pairs at x{pair_scale}, but data.scale={cfg.scale}; "
                         f"set data.scale={pair_scale} or build shards without --lr")
    return shards


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}")


def _identity(cfg: DataConfig, shards: list[tuple[str, int]], rank: int, world_size: int, seed: int) -> dict:
    """What a loader state is only valid for."""
    return {"format": STATE_FORMAT, "shards": f"{stable_hash(*shards):016x}", "rank": rank, "world_size": world_size,
            "num_workers": max(1, cfg.num_workers), "seed": seed, "batch_size": cfg.batch_size,
            "shuffle_buffer": cfg.shuffle_buffer, "crops_per_image": cfg.crops_per_image}


def _check_state(state: dict, identity: dict) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"the saved loader state is not a {STATE_FORMAT} state; it cannot continue this stream")
    differ = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in identity.items() if state.get(k) != v]
    if differ:
        raise ValueError(f"the saved loader state was made with {', '.join(differ)}, so it cannot continue this stream")


def make_train_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0,
                      state: dict | None = None) -> TrainLoader:
    """Endless training batches for one rank; `.skips`, `.samples`, `.retries`, `.paired` for metrics.
    `state` (a `state_dict()` of a loader of the same shards, rank, world size, workers and seed)
    continues that loader's stream exactly; another is refused with a ValueError."""
    _check_rank(rank, world_size)
    shards = _shards(cfg, "train")
    identity = _identity(cfg, shards, rank, world_size, seed)
    start = None
    if state is not None:
        _check_state(state, identity)
        start = {"next_worker": int(state["next_worker"]), "workers": dict(state["workers"])}
    loader = TrainLoader(cfg, ShardStream(cfg, shards, "train", rank, world_size, seed, start), identity)
    if state is not None:
        loader.samples = int(state.get("samples", 0))
    return loader


def make_val_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> ValLoader:
    """One deterministic pass over this rank's share of the val samples per iteration."""
    _check_rank(rank, world_size)
    return ValLoader(cfg, ShardStream(cfg, _shards(cfg, "val"), "val", rank, world_size, cfg.val_seed))
