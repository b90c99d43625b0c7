"""The training stream of one reader (a rank's DataLoader worker): resampled shards -> samples ->
crops -> a resumable block shuffle -> items, each with the reader's position after it.

Even sampling: every reader draws shards uniformly WITH replacement from the FULL train shard list
(draw n of reader (seed, rank, worker) is shard stable_hash(seed, rank, worker, n) % num_shards). A
sample is read iff its shard is drawn, so every sample has the same expected draw rate whatever the
shard sizes and however many ranks x workers read; splitting the shards between readers first
(webdataset's split_by_node / split_by_worker) would give the samples of a reader with fewer
samples a higher rate.

Positions: a crop is (n, j, c) = (shard draw, sample index in the shard, crop of the sample), in
stream order. Crop position, flip/rotation and the degradation seed of a crop come from
random.Random(hash(seed, rank, worker, n, j)), so any crop can be remade from its position.

Block shuffle (replaces a rolling shuffle buffer, whose contents depend on the whole history):
block b is the next `block_size(b)` crops in stream order, emitted in the permutation
hash(seed, rank, worker, b); block sizes double from one batch up to data.shuffle_buffer, so the
first batch does not wait for a full buffer. The reader's state after an item is
{"block": b, "after": position of the last crop before block b (or None), "taken": items of block b
emitted}: resuming re-reads at most one block (plus the skipped head of one shard) and continues
bit-identically.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from linearsr.core import storage
from linearsr.core.util import stable_hash
from linearsr.data.batches import Item, augment, crop_pair
from linearsr.data.config import DataConfig
from linearsr.data.reader import Stats, decode, read_shard


class DataQualityError(ValueError):
    """Too many samples were skipped: the data (or the storage) is broken, training would be biased."""


def block_size(cfg: DataConfig, block: int) -> int:
    return max(1, min(cfg.shuffle_buffer, cfg.batch_size << min(block, 30)))


def _before(a: tuple, b: tuple | None) -> bool:
    """Position a is at or before position b (None: the start, before everything)."""
    return b is not None and tuple(a) <= tuple(b)


class TrainStream:
    """One reader's endless items; `start` is a state from a previous run of the same reader."""

    def __init__(self, cfg: DataConfig, shards: list[tuple[str, int]], seed: int, rank: int, worker: int,
                 stats: Stats, start: dict | None = None):
        self.cfg, self.shards, self.stats = cfg, shards, stats
        self.key = (seed, rank, worker)
        self.start = start or {"block": 0, "after": None, "taken": 0}

    def shard(self, n: int) -> tuple[str, int]:
        return self.shards[stable_hash("shard", *self.key, n) % len(self.shards)]

    def _crops(self, after: tuple | None) -> Iterator[tuple[tuple, Item]]:
        """(position, crop) after `after` in stream order."""
        cfg, stats = self.cfg, self.stats
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-open")

        def open_shard(n):  # the next shard is opened (and, on S3, starts downloading) while this one is decoded
            url, expected = self.shard(n)
            return url, expected, pool.submit(storage.open_read, url, cfg.s3_endpoint)

        n = first = after[0] if after else 0
        nxt = open_shard(n)
        try:
            while True:
                (url, expected, future), nxt = nxt, open_shard(n + 1)
                for j, sample in enumerate(read_shard(url, expected, stats, None, cfg.s3_endpoint, future.result)):
                    if after is not None and (n, j) < tuple(after[:2]):
                        continue  # wholly before the resume point: skipped without decoding
                    decoded = decode(sample, stats, cfg.max_tags, cfg.scale)
                    if decoded is None:
                        continue
                    rng = random.Random(stable_hash("crop", *self.key, n, j))
                    for c in range(cfg.crops_per_image):
                        hr, lr = crop_pair(decoded.hr, decoded.lr, cfg.crop, cfg.scale, rng)
                        if cfg.augment:
                            hr, lr = augment(hr, lr, rng)
                        seed = rng.getrandbits(63)
                        if not _before((n, j, c), after):
                            yield (n, j, c), Item(hr, lr, decoded.tags, sample["__key__"], seed)
                n += 1
                if stats.decoded == 0 and n - first >= 3 * len(self.shards):
                    raise DataQualityError(
                        f"none of the {len(self.shards)} train shards under {cfg.shards} gave a readable sample in {n - first} "
                        f"reads (rank {self.key[1]}, worker {self.key[2]}); check the shards and the storage")
        finally:
            future = nxt[2]
            if not future.cancel() and future.exception() is None:
                future.result().close()
            pool.shutdown(wait=False)

    def items(self) -> Iterator[tuple[Item, dict]]:
        """(item, this reader's state after it), endless."""
        b, after, taken = self.start["block"], self.start["after"], self.start["taken"]
        crops = self._crops(after)
        while True:
            size, block, last = block_size(self.cfg, b), [], after
            for x in crops:
                last = x[0]
                block.append(x[1])
                if len(block) == size:
                    break
            order = list(range(size))
            random.Random(stable_hash("block", *self.key, b)).shuffle(order)
            for o in range(taken, size):
                done = o + 1 == size
                state = {"block": b + 1, "after": list(last), "taken": 0} if done else \
                    {"block": b, "after": after, "taken": o + 1}
                yield block[order[o]], state
            b, after, taken = b + 1, list(last), 0
