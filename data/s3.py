"""webdataset's s3:// opener: importing this module registers `webdataset.gopen_schemes["s3"]`,
so `wds.WebDataset("s3://bucket/shards/train/shard-{000000..000012}.tar")` streams through
`linearsr.core.storage` (retried ranged GETs, the configured endpoint, counted retries).
webdataset 1.0.2 has no s3 opener of its own, and `pipe:aws s3 cp` was 7x slower here.
Register it at module top level, as here, so DataLoader workers that import it see it."""

from __future__ import annotations

import webdataset

from linearsr.core import storage


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset opener for s3:// URLs (read only)."""
    if mode != "rb":
        raise ValueError(f"{url}: the s3 opener only reads (mode 'rb'), got mode {mode!r}")
    return storage.open_read(url, endpoint=kw.get("endpoint"))


webdataset.gopen_schemes["s3"] = gopen_s3
