"""Reading samples out of shards, with every fault counted instead of raised.

Faults and their `skips` reason (counts are in SAMPLES lost, so skipped / read is a fraction):
    missing_shard     the shard does not exist (FileNotFoundError)
    unreadable_shard  it could not be opened even after the S3 retries (network, permissions)
    truncated_shard   the tar stream broke off (tarfile.ReadError "unexpected end of data")
    short_shard       the shard ended early without an error (a damaged tar header ends a tar
                      stream silently) -- noticed by comparing with the manifest's count
    corrupt_image     the image bytes do not decode
    corrupt_sample    a sample without an image, or with unreadable JSON metadata
    bad_pair          a real LR (KEY.lr.png) whose size is not the HR's divided by the scale
Each fault is logged as a warning the first time it is seen in a process (then at debug level).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from typing import BinaryIO, Callable, Iterator, NamedTuple

import numpy as np
import simplejpeg
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from linearsr.core import storage
from linearsr.data.shards import describe, read_shard_manifest, shard_list

log = logging.getLogger(__name__)

# the HR image of a sample: KEY.hr.EXT (paired layout) or KEY.EXT (HR-only shards of format 1)
HR_EXTS = tuple(f"{p}{e}" for p in ("hr.", "") for e in ("png", "jpg", "jpeg", "webp"))
LR_EXT = "lr.png"


class Stats:
    """Counters of one stream in one process (a DataLoader worker or the main process)."""

    def __init__(self, worker: int = 0):
        self.worker = worker
        self.skips: dict[str, int] = {}
        self.decoded = 0  # samples read and decoded (some may still sit in a shuffle buffer)
        self.samples = 0  # samples delivered in batches
        self.paired = 0  # of which with a real LR (KEY.lr.png) instead of a synthetic one
        self._retry_base = storage.retry_count()  # forked workers inherit the parent's count
        self._warned: set = set()

    def skip(self, reason: str, n: int, where: str, detail: str) -> None:
        if n <= 0:
            return
        self.skips[reason] = self.skips.get(reason, 0) + n
        level = logging.DEBUG if (reason, where) in self._warned else logging.WARNING
        self._warned.add((reason, where))
        log.log(level, "data: skipped %d sample(s), %s: %s (%s)", n, reason.replace("_", " "), where, detail)

    def snapshot(self) -> dict:
        return {"worker": self.worker, "skips": dict(self.skips), "decoded": self.decoded, "samples": self.samples,
                "paired": self.paired, "retries": storage.retry_count() - self._retry_base}


def read_shard(url: str, expected: int, stats: Stats, window: tuple[int, int] | None = None,
               endpoint: str | None = None,
               opener: Callable[[], BinaryIO] | None = None) -> Iterator[dict]:
    """Raw samples {"__key__", "__url__", ext: bytes, ...} of one shard whose index lies in `window`
    (default: all `expected`), accounting every sample of the window that does not arrive.
    `opener` (default: storage.open_read) lets a caller hand over a shard it opened ahead of time."""
    lo, hi = window or (0, expected)
    index = got = 0
    try:
        stream = opener() if opener else storage.open_read(url, endpoint)
    except FileNotFoundError as e:
        stats.skip("missing_shard", hi - lo, url, str(e).splitlines()[0])
        return
    except Exception as e:
        stats.skip("unreadable_shard", hi - lo, url, f"{type(e).__name__}: {e}")
        return
    try:
        with stream:
            for sample in group_by_keys(dict(f, __url__=url) for f in tar_file_iterator(stream)):
                if index >= hi:
                    return
                if index >= lo:
                    got += 1
                    yield sample
                index += 1
    except (tarfile.TarError, EOFError) as e:
        stats.skip("truncated_shard", hi - lo - got, url, f"{type(e).__name__}: {e} after {index} samples")
        return
    except OSError as e:  # the connection failed for good in the middle of the shard
        stats.skip("unreadable_shard", hi - lo - got, url, f"{type(e).__name__}: {e} after {index} samples")
        return
    if got < hi - lo:
        stats.skip("short_shard", hi - lo - got, url, f"ended after {index} samples, manifest says {expected}")


class Decoded(NamedTuple):
    hr: np.ndarray  # [H, W, 3] uint8
    tags: list[str]
    lr: np.ndarray | None  # [H/s, W/s, 3] uint8: a real low-resolution capture, or None (synthesise one)


def decode_image(data: bytes) -> np.ndarray:
    """[H, W, 3] uint8 of image bytes: JPEG through libjpeg-turbo (simplejpeg, ~5x Pillow on a 2 MP
    photo, the same pixels), anything else (and JPEGs it cannot read, e.g. CMYK) through Pillow."""
    if data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def decode(sample: dict, stats: Stats, max_tags: int = 8, scale: int | None = None) -> Decoded | None:
    """The HR image, the tags and the real LR if the sample has one of a raw sample, or None
    (counted) when it is unusable. With `scale`, a real LR must be exactly the HR's size / scale."""
    key = sample["__key__"]
    where = f"{key} in {sample['__url__']}" if "__url__" in sample else key
    ext = next((e for e in HR_EXTS if e in sample), None)
    if ext is None:
        stats.skip("corrupt_sample", 1, where, f"no image in the sample (has {sorted(k for k in sample if not k.startswith('__'))})")
        return None
    tags: list[str] = []
    if "json" in sample:
        try:
            tags = [str(t).strip().lower() for t in json.loads(sample["json"]).get("tags", [])][:max_tags]
        except (ValueError, AttributeError) as e:
            stats.skip("corrupt_sample", 1, where, f"bad JSON metadata: {e}")
            return None
    try:
        hr = decode_image(sample[ext])
        lr = decode_image(sample[LR_EXT]) if LR_EXT in sample else None
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        stats.skip("corrupt_image", 1, where, describe(e))
        return None
    if lr is not None and scale is not None and (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
        stats.skip("bad_pair", 1, where, f"LR {lr.shape[1]}x{lr.shape[0]} is not HR {hr.shape[1]}x{hr.shape[0]} / {scale}")
        return None
    stats.decoded += 1
    return Decoded(hr, tags, lr)


def iter_samples(root: str, split: str = "train", endpoint: str | None = None,
                 stats: Stats | None = None) -> Iterator[dict]:
    """Every raw sample of one split in manifest order: {"__key__", "__url__", "png"|"jpg": bytes, "json": bytes}.
    For tools that want the stored bytes (the tagger, tests); training uses the loaders."""
    manifest = read_shard_manifest(root, endpoint)
    stats = stats or Stats()
    for url, expected in shard_list(root, manifest, split):
        yield from read_shard(url, expected, stats, endpoint=endpoint)
