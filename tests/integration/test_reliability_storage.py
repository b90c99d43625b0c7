"""Storage faults under the loaders: a proxy on 127.0.0.1 between the loaders and the local S3
server resets connections, answers 503 SlowDown and cuts response bodies off
(tests/support/faultproxy.py). The loaders lose and duplicate nothing: the val pass gives every
val sample exactly once and the train stream is the very stream a fault-free run gives; every
fault is retried and counted. The same faults under a real training run (checkpoints, metrics,
TensorBoard on S3): test_reliability_runs.py."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from linearsr.core import storage
from linearsr.data.config import DataConfig
from linearsr.data.loader import make_train_loader, make_val_loader
from linearsr.data.reader import iter_samples
from tests.support.faultproxy import FaultProxy

pytestmark = pytest.mark.integration


def upload_shards(local_root: str, url: str) -> str:
    fs, _ = storage.filesystem(url)
    fs.put(local_root, url[len("s3://"):], recursive=True)
    return url


def test_loaders_through_faulty_storage_lose_and_duplicate_nothing(s3_bucket, s3_server, tiny_shards):
    root = upload_shards(tiny_shards, f"{s3_bucket}/tiny")
    val_keys = [s["__key__"] for s in iter_samples(root, "val")]

    def cfg(endpoint: str) -> DataConfig:
        return DataConfig(shards=root, crop=32, val_crop=32, batch_size=2, num_workers=2, shuffle_buffer=4,
                          max_skip_fraction=0.0, skip_check_after=0, s3_endpoint=endpoint)

    def train_batches(c: DataConfig, n: int = 12):
        loader = make_train_loader(c, seed=3)
        try:
            return [next(loader) for _ in range(n)], loader
        finally:
            loader.close()

    clean, _ = train_batches(cfg(s3_server.endpoint))

    # validation through the proxy: each sample exactly once, and every fault cost one counted retry
    with FaultProxy(s3_server.endpoint, reset=0.1, slowdown=0.15, truncate=0.15, seed=1) as proxy:
        before = storage.retry_count()  # the manifest is read in this process, the shards in 2 workers
        val = make_val_loader(cfg(proxy.url))
        got = Counter(k for b in val for k in b["key"])
        counted = storage.retry_count() - before + val.retries
    assert got == Counter(val_keys) and val.skips == {}
    c = proxy.counts
    assert c["slowdown"] + c["truncate"] >= 1, c  # the seeded rates did inject faults
    # a 503 or a cut body always reaches our retry loop; a dropped connection is re-sent once by aiohttp first
    assert c["slowdown"] + c["truncate"] <= counted <= proxy.injected, (counted, c)

    # training through the proxy: the same batches, bit for bit, as without faults (seed 13 answers
    # SlowDown to the workers' first requests: retries that the delivered batches must report)
    with FaultProxy(s3_server.endpoint, reset=0.1, slowdown=0.15, truncate=0.15, seed=13) as proxy:
        faulty, loader = train_batches(cfg(proxy.url))
    assert proxy.injected >= 1 and loader.skips == {}
    assert [b["key"] for b in faulty] == [b["key"] for b in clean]
    assert all(torch.equal(a["lr"], b["lr"]) and torch.equal(a["hr"], b["hr"]) for a, b in zip(faulty, clean))
    assert loader.retries >= 1
