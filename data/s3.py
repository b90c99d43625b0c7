"""Reading shards from s3:// (and any fsspec URL) with retries, exponential backoff and a counter.

Importing this module registers `webdataset.gopen_schemes["s3"]`, so `wds.WebDataset("s3://...")`
works too (at module top level: DataLoader workers that import it see it). webdataset 1.0.2 has no
s3 opener of its own, and `pipe:aws s3 cp` was 7x slower here.

Every S3 request is retried by this module alone (botocore's and s3fs's own retries are switched
off), so `retry_count()` counts every retry. The endpoint is `endpoint` if given, else
AWS_ENDPOINT_URL, else AWS; credentials come from the environment / AWS config and are never logged.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import random
import threading
import time
from typing import Callable, TypeVar

import fsspec
import webdataset

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 4 << 20  # bytes per ranged GET while streaming a shard
_lock = threading.Lock()
_retries = 0
_filesystems: dict = {}


def retry_count() -> int:
    """Retries made by this process since it started (forked workers inherit the parent's count)."""
    return _retries


def _count_retry() -> None:
    global _retries
    with _lock:
        _retries += 1


def endpoint_url(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(endpoint: str | None = None):
    """One s3fs filesystem per (process, endpoint), with its internal retries off (ours count them)."""
    import s3fs

    ep = endpoint_url(endpoint)
    key = (os.getpid(), ep)
    if key not in _filesystems:
        fs = s3fs.S3FileSystem(
            endpoint_url=ep,
            config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}, "connect_timeout": 10, "read_timeout": 60},
            skip_instance_cache=True,
        )
        fs.retries = 1  # s3fs's own retry loop (a class attribute): one attempt
        _filesystems[key] = fs
    return _filesystems[key]


def filesystem(url: str, endpoint: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path, s3:// URL (our s3fs settings) or any fsspec URL."""
    if url.startswith("s3://"):
        return s3_filesystem(endpoint), url[len("s3://"):]
    return fsspec.core.url_to_fs(url)


def _credentials_error(e: BaseException) -> bool:
    return type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def _fatal(e: BaseException) -> bool:
    """Errors that no retry can fix: a missing object or bucket, denied access, no credentials."""
    return isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, ValueError, TypeError)) or _credentials_error(e)


class StorageError(OSError):
    """A storage request that still failed after all its retries (names the request and the count)."""


def _user_error(e: Exception, what: str, attempts: int, endpoint: str | None) -> Exception:
    """A one-sentence error a user can act on, for the failures that are theirs to fix; a transient
    error that outlived its retries becomes a StorageError naming the request."""
    if _credentials_error(e):
        return PermissionError(f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "(or AWS_PROFILE) in the environment (for the local server: `. runs/s3/env`)")
    if type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or \
            isinstance(e, ConnectionRefusedError):
        return ConnectionError(f"{what}: cannot reach the storage endpoint {endpoint_url(endpoint) or '(AWS)'} after {attempts} "
                               f"attempts ({type(e).__name__}); check AWS_ENDPOINT_URL / data.s3_endpoint and the network")
    if _fatal(e):
        return e
    first = (str(e).strip().splitlines() or [""])[0]
    return StorageError(f"{what} failed after {attempts} attempts ({type(e).__name__}: {first}); "
                        "the storage kept failing or throttling (the retry warnings above name each attempt)")


def with_retries(fn: Callable[[], T], what: str, retries: int = 5, endpoint: str | None = None,
                 base_delay: float = 0.1, max_delay: float = 5.0) -> T:
    """Call fn(); on a transient error retry up to `retries` times with jittered exponential backoff.
    Missing credentials or an unreachable endpoint end as PermissionError / ConnectionError."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if _fatal(e) or attempt == retries:
                err = _user_error(e, what, attempt + 1, endpoint)
                if err is e:
                    raise
                raise err from e
            delay = min(max_delay, base_delay * 2**attempt) * (0.5 + random.random())  # 0.1 s ... 5 s
            _count_retry()
            log.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(e).__name__, e, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class RetryingReader(io.RawIOBase):
    """A sequential reader over one object: ranged GETs of CHUNK bytes, each retried on failure,
    so a connection reset in the middle of a shard costs one retried request, not the shard."""

    def __init__(self, fs, path: str, retries: int, endpoint: str | None = None, chunk: int = CHUNK):
        super().__init__()
        self.fs, self.path, self.retries, self.endpoint, self.chunk = fs, path, retries, endpoint, chunk
        self.size = with_retries(lambda: fs.size(path), f"HEAD s3://{path}", retries, endpoint)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= self.size:
            return 0
        end = min(self.size, self.pos + min(len(b), self.chunk))
        start = self.pos
        data = with_retries(lambda: self.fs.cat_file(self.path, start=start, end=end), f"GET s3://{self.path}",
                            self.retries, self.endpoint)
        if len(data) != end - start:
            raise OSError(f"s3://{self.path}: expected {end - start} bytes at offset {start}, got {len(data)}")
        b[: len(data)] = data
        self.pos = end
        return len(data)


class ReadAhead(io.RawIOBase):
    """Reads `raw` in a background thread, up to `depth` chunks ahead, so downloading the rest of
    a shard overlaps with decoding its first samples. Errors surface in the reader unchanged."""

    def __init__(self, raw: io.RawIOBase, chunk: int, depth: int = 4):
        super().__init__()
        self.raw, self.chunk = raw, chunk
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.buf, self.eof = memoryview(b""), False
        self.thread = threading.Thread(target=self._fill, name="shard-readahead", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            while not self.stop.is_set():
                data = self.raw.read(self.chunk)
                if not self._put(data or b"") or not data:
                    return
        except BaseException as e:  # handed to the reading thread
            self._put(e)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self.buf:
            if self.eof:
                return 0
            item = self.queue.get()
            if isinstance(item, BaseException):
                self.eof = True
                raise item
            if not item:
                self.eof = True
                return 0
            self.buf = memoryview(item)
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self.stop.set()
            self.thread.join(timeout=30)
            self.raw.close()
        super().close()


def open_url(url: str, endpoint: str | None = None, retries: int = 5) -> io.BufferedIOBase:
    """Open a shard for sequential binary reading. s3:// goes through RetryingReader with a
    read-ahead thread; a local path is opened directly; other fsspec URLs through fsspec.
    Missing: FileNotFoundError (raised here, not on the first read)."""
    if url.startswith("s3://"):
        raw = RetryingReader(s3_filesystem(endpoint), url[len("s3://"):], retries, endpoint)
        return io.BufferedReader(ReadAhead(raw, CHUNK), 1 << 20)
    if "://" not in url or url.startswith("file://"):
        return open(url[len("file://"):] if url.startswith("file://") else url, "rb", buffering=1 << 20)
    return fsspec.open(url, "rb").open()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset opener for s3:// URLs (read only)."""
    if mode != "rb":
        raise ValueError(f"{url}: the s3 opener only reads (mode 'rb'), got mode {mode!r}")
    return open_url(url, endpoint=kw.get("endpoint"), retries=kw.get("retries", 5))


webdataset.gopen_schemes["s3"] = gopen_s3
