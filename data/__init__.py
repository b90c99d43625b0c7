"""LinearSR data: shard building, streaming from local folders / S3, HR -> LR degradation.

    from linearsr.data import DataConfig, make_train_loader, make_val_loader, degrade_batch, finish_batch

Names are imported lazily so `import linearsr.data.config` stays cheap."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "linearsr.data.config",
    "DegradationConfig": "linearsr.data.config",
    "make_train_loader": "linearsr.data.loader",
    "make_val_loader": "linearsr.data.loader",
    "DataQualityError": "linearsr.data.loader",
    "degrade": "linearsr.data.degradations",
    "degrade_batch": "linearsr.data.degradations",
    "degradation_tags": "linearsr.data.degradations",
    "finish_batch": "linearsr.data.batches",
    "bicubic_down": "linearsr.data.degrade",
    "build_shards": "linearsr.data.shards",
    "read_shard_manifest": "linearsr.data.shards",
    "iter_samples": "linearsr.data.reader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'linearsr.data' has no attribute {name!r}")
