"""Storage: the one module that touches a run dir, a shard root or a bundle by URL.

A URL is a local path (or file://...), s3://bucket/key, or any other fsspec URL. Local paths
use the OS directly, so `linearsr upscale` needs no fsspec; everything remote goes through
`filesystem(url)` and `with_retries`.

    exists / size / read_bytes / read_text / read_json / ls / find / rm
    write_bytes_atomic / write_text_atomic / write_json   a reader sees the old or the new file
    put_file / get_file / upload_dir / download_dir       copies (S3: multipart, retried per part)
    open_read(url)                                        sequential reads, ranged GETs retried
    create_exclusive / replace_if_unchanged               conditional writes (the sidecar lease)
    retry_count()                                         retries this process made, every kind

Retries, as configured by `configure(StorageConfig)` (the trainer's `[storage]` section):
every S3 request is retried by botocore in its `standard` or `adaptive` mode (up to
`request_attempts` attempts, exponential backoff to 20 s; a multipart upload retries each part,
not the object); a call that still fails is retried whole by `with_retries`, with jittered
exponential backoff, until `retry_budget_s` has passed since its first attempt (default 10 min:
an outage that long is ridden out). An endpoint that has never answered this process gets
`connect_budget_s` (a mistyped AWS_ENDPOINT_URL fails in seconds, not minutes). Errors no retry
can fix (a missing object, denied access, no credentials, a bad argument) are raised at once.
Every retry, botocore's and ours, is counted by `retry_count()`.

JSON files hold strict JSON: non-finite floats are written as the strings "nan", "inf", "-inf"
and read back as floats (`dumps` / `loads`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import queue
import random
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 4 << 20  # bytes per ranged GET while streaming an object


@dataclass(frozen=True)
class StorageConfig:
    """How hard storage requests are retried (see the module docstring)."""

    retry_mode: Literal["standard", "adaptive"] = "standard"  # botocore's; adaptive adds client-side rate limiting
    request_attempts: int = 5  # botocore attempts per request (per part of a multipart upload)
    retry_budget_s: float = 600.0  # retry a failing call for this long before giving up
    connect_budget_s: float = 20.0  # ... or this long when the endpoint never answered this process
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def __post_init__(self):
        if self.retry_mode not in ("standard", "adaptive"):
            raise ValueError(f"storage.retry_mode must be standard or adaptive, got {self.retry_mode!r}")
        if self.request_attempts < 1:
            raise ValueError(f"storage.request_attempts must be >= 1, got {self.request_attempts}")
        for name in ("retry_budget_s", "connect_budget_s", "connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"storage.{name} must be > 0, got {getattr(self, name)}")


_settings = StorageConfig()
_lock = threading.Lock()
_retries = 0
_filesystems: dict = {}
_answered: set = set()  # S3 endpoints that answered this process at least once (any HTTP status)


def configure(cfg: StorageConfig) -> None:
    """Use these retry settings from now on (in this process and the ones it forks)."""
    global _settings
    _settings = cfg
    _filesystems.clear()


def settings() -> StorageConfig:
    return _settings


def retry_count() -> int:
    """Retries made by this process so far (forked workers inherit the parent's count)."""
    return _retries


def _count_retry(**_) -> None:
    global _retries
    with _lock:
        _retries += 1


# --------------------------------------------------------------------------- URLs


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL (always with '/' for URLs)."""
    if is_local(url):
        return os.path.join(local_path(url), *parts)
    return posixpath.join(url, *parts)


def endpoint_url(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL") or None


def _on_needs_retry(attempts: int, **_) -> None:
    # botocore asks after every attempt whether to retry; attempt n >= 2 exists only because of a retry
    if attempts >= 2:
        _count_retry()


def s3_options(endpoint: str | None = None) -> dict:
    """s3fs.S3FileSystem keyword arguments for the endpoint and the configured botocore retries
    (picklable: what Ray Train's own storage filesystem is built from)."""
    cfg = _settings
    return {"endpoint_url": endpoint_url(endpoint), "skip_instance_cache": True,
            "config_kwargs": {"retries": {"total_max_attempts": cfg.request_attempts, "mode": cfg.retry_mode},
                              "connect_timeout": cfg.connect_timeout_s, "read_timeout": cfg.read_timeout_s}}


def s3_filesystem(endpoint: str | None = None):
    """One s3fs filesystem per (process, endpoint, settings): botocore retries in the configured
    mode, each one counted; s3fs's own whole-call retry loop is off (ours counts and budgets it)."""
    import aiobotocore.session
    import s3fs

    ep = endpoint_url(endpoint)
    key = (os.getpid(), ep, _settings)
    if key not in _filesystems:
        session = aiobotocore.session.AioSession()
        session.register("needs-retry.s3", _on_needs_retry)
        session.register("after-call.s3", lambda **_: _answered.add(ep))  # an HTTP answer, even an error status
        fs = s3fs.S3FileSystem(session=session, **s3_options(endpoint))
        fs.retries = 1
        _filesystems[key] = fs
    return _filesystems[key]


def filesystem(url: str, endpoint: str | None = None):
    """(fsspec filesystem, path inside it) for any URL; s3:// gets `s3_filesystem`'s settings."""
    if url.startswith("s3://"):
        return s3_filesystem(endpoint), url[len("s3://"):]
    import fsspec

    return fsspec.core.url_to_fs(url)


# --------------------------------------------------------------------------- retries


class StorageError(OSError):
    """A storage call that still failed when its retry budget was spent (names the call)."""


def _credentials_error(e: BaseException) -> bool:
    return type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def _connect_error(e: BaseException) -> bool:
    return type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or \
        isinstance(e, ConnectionRefusedError)


def _fatal(e: BaseException) -> bool:
    """Errors that no retry can fix: a missing object or bucket, denied access, no credentials."""
    return isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
                          ValueError, TypeError)) or _credentials_error(e)


def _user_error(e: Exception, what: str, attempts: int, seconds: float, endpoint: str | None) -> Exception:
    if _credentials_error(e):
        return PermissionError(f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "(or AWS_PROFILE) in the environment (for the local server: `. runs/s3/env`)")
    if _connect_error(e) and endpoint_url(endpoint) not in _answered:
        return ConnectionError(f"{what}: cannot reach the storage endpoint {endpoint_url(endpoint) or '(AWS)'} after "
                               f"{attempts} attempts ({type(e).__name__}); check AWS_ENDPOINT_URL / data.s3_endpoint "
                               "and the network")
    if _fatal(e):
        return e
    first = (str(e).strip().splitlines() or [""])[0]
    return StorageError(f"{what} failed for {seconds:.0f} s ({attempts} attempts, last {type(e).__name__}: {first}); "
                        f"the storage kept failing or throttling past storage.retry_budget_s={_settings.retry_budget_s:g}")


def with_retries(fn: Callable[[], T], what: str, endpoint: str | None = None, base_delay: float = 0.2,
                 max_delay: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """fn() retried on transient errors with jittered exponential backoff until the retry budget
    (StorageConfig.retry_budget_s, from the first attempt) is spent; every retry is counted."""
    start, attempt, ep = time.monotonic(), 0, endpoint_url(endpoint)
    while True:
        try:
            return fn()
        except Exception as e:
            attempt += 1
            elapsed = time.monotonic() - start
            budget = _settings.retry_budget_s if ep in _answered or not _connect_error(e) else _settings.connect_budget_s
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            if _fatal(e) or elapsed + delay > budget:
                err = _user_error(e, what, attempt, elapsed, endpoint)
                if err is e:
                    raise
                raise err from e
            _count_retry()
            log.warning("%s failed (%s: %s); retry %d in %.2fs (%.0f s of the %.0f s budget used)",
                        what, type(e).__name__, e, attempt, delay, elapsed, budget)
            sleep(delay)


# --------------------------------------------------------------------------- JSON with non-finite floats


def _encode(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return _encode(obj.item())
    return obj


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _decode(obj: Any) -> Any:
    if isinstance(obj, str) and obj in _NONFINITE:
        return _NONFINITE[obj]
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """JSON text with nan/inf as strings (strict JSON, readable by any tool)."""
    return json.dumps(_encode(obj), allow_nan=False, **kw)


def loads(text: str) -> Any:
    return _decode(json.loads(text))


# --------------------------------------------------------------------------- whole files


def _remote(url: str, what: str, op: Callable[[Any, str], T]) -> T:
    fs, path = filesystem(url)
    return with_retries(lambda: op(fs, path), f"{what} {url}")


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    return _remote(url, "check", lambda fs, p: fs.exists(p))


def size(url: str) -> int:
    if is_local(url):
        return os.path.getsize(local_path(url))
    return int(_remote(url, "size of", lambda fs, p: fs.size(p)))


def read_bytes(url: str) -> bytes:
    if is_local(url):
        with open(local_path(url), "rb") as f:
            return f.read()
    return _remote(url, "read", lambda fs, p: fs.cat_file(p))


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str, what: str | None = None, raw: bool = False) -> Any:
    """The JSON at url, "nan"/"inf"/"-inf" strings read back as floats unless `raw` (a format
    whose readers parse those strings themselves, e.g. a bundle's interval bounds). With `what`
    ("bundle manifest"), a missing file or bad JSON is one sentence naming it: FileNotFoundError /
    ValueError."""
    parse = json.loads if raw else loads
    if what is None:
        return parse(read_text(url))
    try:
        text = read_text(url)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{what} {url!r} does not exist") from None
    try:
        return parse(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {url!r} is not valid JSON ({e.msg} at line {e.lineno})") from None


def read_json_or_none(url: str) -> Any | None:
    try:
        return read_json(url)
    except FileNotFoundError:
        return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_local_atomic(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """A local file written by `write(f)` that a reader sees whole or not at all: a temp file in the
    same folder, fsync, rename into place, fsync the folder.
    The file gets a plain open()'s permissions (0666 minus the umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """A whole file that a reader sees old or new, never mixed. Local: temp + fsync + rename.
    Object stores: one PUT (atomic), retried (a retried PUT writes the same bytes again)."""
    if is_local(url):
        write_local_atomic(local_path(url), lambda f: f.write(data))
    else:
        _remote(url, "write", lambda fs, p: fs.pipe_file(p, data))


def write_safetensors(url: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """torch tensors (moved to the CPU, made contiguous) as one safetensors file, atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_bytes_atomic(url, data)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text_atomic(url, dumps(obj, indent=2, sort_keys=True) + "\n")


def put_file(src: str, url: str) -> None:
    """Copy a local file to `url` atomically (S3: multipart above s3fs's part size, each part
    retried by botocore; the object appears only when complete)."""
    if is_local(url):
        with open(src, "rb") as fin:
            write_local_atomic(local_path(url), lambda fout: shutil.copyfileobj(fin, fout, 1 << 20))
    else:
        _remote(url, "upload to", lambda fs, p: fs.put_file(src, p))


def get_file(url: str, dest: str) -> None:
    """Copy `url` to the local file `dest` (written atomically)."""
    if is_local(url):
        put_file(local_path(url), dest)
        return
    os.makedirs(os.path.dirname(os.path.abspath(dest)) or ".", exist_ok=True)
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    _remote(url, "download", lambda fs, p: fs.get_file(p, tmp))
    os.replace(tmp, dest)


def find(url: str) -> dict[str, int]:
    """Every file below `url`: {relative path with '/', size in bytes}; {} when it does not exist."""
    if is_local(url):
        root = local_path(url)
        return {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"): os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(root) for f in files}
    fs, path = filesystem(url)
    found = with_retries(lambda: fs.find(path, detail=True), f"list {url}")
    prefix = path.rstrip("/") + "/"
    return {p[len(prefix):]: int(info.get("size") or 0) for p, info in found.items() if p.startswith(prefix)}


def ls(url: str) -> list[str]:
    """Names (not paths) directly below `url`; FileNotFoundError when it does not exist."""
    if is_local(url):
        return sorted(os.listdir(local_path(url)))
    entries = _remote(url, "list", lambda fs, p: fs.ls(p, detail=False))
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def rm(url: str, recursive: bool = False) -> None:
    """Delete a file (or a folder with recursive=True); nothing happens when it does not exist."""
    if is_local(url):
        path = local_path(url)
        if os.path.isdir(path) and recursive:
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, path = filesystem(url)
    if with_retries(lambda: fs.exists(path), f"check {url}"):
        with_retries(lambda: fs.rm(path, recursive=recursive), f"delete {url}")


def upload_dir(local_dir: str, url: str, files: list[str] | None = None) -> list[str]:
    """Copy the files under `local_dir` (or only `files`, relative paths) into `url`, each
    atomically. Returns the relative paths copied."""
    rels = sorted(files if files is not None else find(local_dir))
    for rel in rels:
        put_file(os.path.join(local_dir, rel), join(url, rel))
    return rels


def download_dir(url: str, local_dir: str, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Copy the files below `url` whose relative path passes `keep` into `local_dir`."""
    rels = sorted(r for r in find(url) if keep is None or keep(r))
    for rel in rels:
        get_file(join(url, rel), os.path.join(local_dir, rel))
    return rels


# --------------------------------------------------------------------------- conditional writes


def create_exclusive(url: str, data: bytes) -> str | None:
    """Create `url` only if it does not exist yet: its version tag (see read_with_tag), or None
    if it already existed. S3: a PUT with If-None-Match: * (decided by the server); local: O_EXCL."""
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            return _local_tag(os.fstat(f.fileno()))
    return _conditional_put(url, data, IfNoneMatch="*")


def _local_tag(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def read_with_tag(url: str) -> tuple[bytes, str] | None:
    """(content, version tag) of `url`, or None when absent. The tag changes with every write
    (S3: the ETag, read in the same request as the content)."""
    if is_local(url):
        try:
            with open(local_path(url), "rb") as f:
                data, st = f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        return data, _local_tag(st)
    import fsspec.asyn

    fs, path = filesystem(url)
    bucket, key = path.split("/", 1)

    async def get():
        out = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with out["Body"] as body:
            return await body.read(), out["ETag"]

    try:
        return with_retries(lambda: fsspec.asyn.sync(fs.loop, get), f"read {url}")
    except FileNotFoundError:
        return None


def replace_if_unchanged(url: str, data: bytes, tag: str) -> str | None:
    """Overwrite `url` only if its version tag is still `tag`: the new tag, or None if someone
    else wrote it in between. S3: a PUT with If-Match: ETag (decided by the server); local:
    compare, then rename (a local run dir lives on one host)."""
    if is_local(url):
        now = read_with_tag(url)
        if now is None or now[1] != tag:
            return None
        write_bytes_atomic(url, data)
        return _local_tag(os.stat(local_path(url)))
    return _conditional_put(url, data, IfMatch=tag)


def _precondition_failed(e: BaseException) -> bool:
    if isinstance(e, FileExistsError):  # s3fs's name for a failed If-None-Match
        return True
    cause = e.__cause__ if e.__cause__ is not None else e
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict")


def _conditional_put(url: str, data: bytes, **condition) -> str | None:
    fs, path = filesystem(url)
    bucket, key = path.split("/", 1)

    def put() -> str | None:
        try:
            return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise

    return with_retries(put, f"conditional write {url}")


# --------------------------------------------------------------------------- streaming reads


class RetryingReader(io.RawIOBase):
    """A sequential reader over one object: ranged GETs of CHUNK bytes, each retried, so a
    connection reset in the middle of a shard costs one retried request, not the shard."""

    def __init__(self, fs, path: str, endpoint: str | None = None, chunk: int = CHUNK):
        super().__init__()
        self.fs, self.path, self.endpoint, self.chunk = fs, path, endpoint, chunk
        self.size = with_retries(lambda: fs.size(path), f"HEAD s3://{path}", endpoint)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= self.size:
            return 0
        start, end = self.pos, min(self.size, self.pos + min(len(b), self.chunk))

        def get() -> bytes:
            data = self.fs.cat_file(self.path, start=start, end=end)
            if len(data) != end - start:  # a cut-off body: retried like any transient error
                raise OSError(f"s3://{self.path}: expected {end - start} bytes at offset {start}, got {len(data)}")
            return data

        data = with_retries(get, f"GET s3://{self.path}", self.endpoint)
        b[: len(data)] = data
        self.pos = end
        return len(data)


class ReadAhead(io.RawIOBase):
    """Reads `raw` in a background thread, up to `depth` chunks ahead, so downloading the rest of
    an object overlaps with decoding its beginning. Errors surface in the reader unchanged."""

    def __init__(self, raw: io.RawIOBase, chunk: int, depth: int = 4):
        super().__init__()
        self.raw, self.chunk = raw, chunk
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.buf, self.eof = memoryview(b""), False
        self.thread = threading.Thread(target=self._fill, name="storage-readahead", daemon=True)
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


def open_read(url: str, endpoint: str | None = None) -> io.BufferedIOBase:
    """Open an object for sequential binary reading: s3:// through RetryingReader with a
    read-ahead thread, a local path directly, other fsspec URLs through fsspec.
    A missing object raises FileNotFoundError here, not on the first read."""
    if url.startswith("s3://"):
        raw = RetryingReader(s3_filesystem(endpoint), url[len("s3://"):], endpoint)
        return io.BufferedReader(ReadAhead(raw, CHUNK), 1 << 20)
    if is_local(url):
        return open(local_path(url), "rb", buffering=1 << 20)
    import fsspec

    return fsspec.open(url, "rb").open()
