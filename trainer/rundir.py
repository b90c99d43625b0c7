"""The run-directory contract: paths, metrics.jsonl, atomic JSON files.

One experiment = one run URL (a local folder or any fsspec URL such as s3://bucket/prefix/NAME).
Stages talk only through these files; the trainer writes them, the sidecar reads them, and an
operator can read them too:

    RUN/config.json               resolved config of the run
    RUN/metrics.jsonl             one JSON object per validation (rank 0 appends)
    RUN/tb/                       TensorBoard event files
    RUN/checkpoints/...           Ray Train checkpoints (DeepSpeed shards + meta.json)
    RUN/analysis/state.json       the sidecar's own state
    RUN/analysis/decision.json    the ESGF decision
    RUN/analysis/curve.png        the validation curve with the knee marked
    RUN/experts/<i>_<lo>_<hi>/    one run dir per expert (same layout)
    RUN/bundle/manifest.json      the MoE bundle read by `linearsr upscale`

Non-finite floats are written as the strings "nan", "inf", "-inf" and read back as floats.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import fsspec

# metrics.jsonl field names (more may be added, none renamed)
METRIC_FIELDS = (
    "step", "samples", "wall_time", "train_loss", "val_loss", "val_loss_by_interval",
    "lr", "grad_norm", "samples_per_s", "data_skips", "checkpoint",
)


# --------------------------------------------------------------------------- URLs


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL (always with '/')."""
    if is_local(url):
        return os.path.join(local_path(url), *parts)
    return posixpath.join(url, *parts)


def fs_for(url: str, **storage_options) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URL and the path inside it. For s3:// the endpoint in force
    (AWS_ENDPOINT_URL) is part of the key of fsspec's instance cache, so a changed endpoint never
    gets a client still pointing at the old one."""
    if url.startswith("s3://") and "endpoint_url" not in storage_options:
        from linearsr.data.s3 import endpoint_url

        if endpoint_url():
            storage_options["endpoint_url"] = endpoint_url()
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path


def _storage(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a remote URL; s3:// through linearsr.data.s3 (its own retry loop only)."""
    from linearsr.data.s3 import filesystem

    return filesystem(url)


def _retried(fn, what: str):
    """fn() retried on transient storage errors with backoff; retries counted (`storage_retries`)."""
    from linearsr.data.s3 import with_retries

    return with_retries(fn, what)


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = _storage(url)
    return _retried(lambda: fs.exists(path), f"check {url}")


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


# --------------------------------------------------------------------------- atomic files


def write_text_atomic(url: str, text: str) -> None:
    """Write a whole file so that a reader sees the old or the new content, never a mix.
    Local: temp file in the same folder + fsync + rename. Object stores: one PUT (atomic),
    retried on transient errors (a retried PUT writes the same bytes again)."""
    write_bytes_atomic(url, text.encode("utf-8"))


def write_bytes_atomic(url: str, data: bytes) -> None:
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = _storage(url)
    _retried(lambda: fs.pipe_file(path, data), f"write {url}")


def write_json(url: str, obj: Any) -> None:
    write_text_atomic(url, dumps(obj, indent=2, sort_keys=True) + "\n")


def read_text(url: str) -> str:
    if is_local(url):
        with open(local_path(url), encoding="utf-8") as f:
            return f.read()
    fs, path = _storage(url)
    return _retried(lambda: fs.cat_file(path), f"read {url}").decode("utf-8")


def read_json(url: str) -> Any:
    return loads(read_text(url))


def read_json_or_none(url: str) -> Any | None:
    try:
        return read_json(url)
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- metrics.jsonl


def parse_jsonl(text: str) -> list[dict]:
    """Parse JSON lines; a last line without its newline (a write in progress) is ignored,
    and so is an unparsable last line. A bad line in the middle is an error: the file was damaged."""
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]
    records = []
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            records.append(loads(line))
        except json.JSONDecodeError as e:
            if i == len(complete) - 1 and not tail:
                break  # damaged final line (e.g. a torn write followed by newline) - treat as partial
            raise ValueError(f"metrics line {i + 1} is not valid JSON ({e}); the file is damaged") from None
    if tail.strip():
        try:  # a complete object that only lacks its newline is still a record
            records.append(loads(tail))
        except json.JSONDecodeError:
            pass
    return records


def read_metrics(run_url: str) -> list[dict]:
    """All complete records of RUN/metrics.jsonl ([] when the file does not exist yet)."""
    try:
        return parse_jsonl(read_text(join(run_url, "metrics.jsonl")))
    except FileNotFoundError:
        return []


class MetricsWriter:
    """Appends records to RUN/metrics.jsonl (rank 0 only).

    Local files are appended and fsynced line by line. Object stores cannot append, so the
    whole file is rewritten with one atomic PUT per record (the file stays small: one line
    per validation). On resume, records at or after `truncate_after_step` are dropped so the
    curve continues from the checkpoint without duplicate steps."""

    def __init__(self, run_url: str, resume_step: int | None = None):
        self.url = join(run_url, "metrics.jsonl")
        self._records = read_metrics(run_url)
        kept = self._records
        if resume_step is not None:
            kept = [r for r in self._records if r.get("step", 0) <= resume_step]
        if len(kept) != len(self._records) or self._needs_rewrite():
            self._records = kept
            self._rewrite()

    def _needs_rewrite(self) -> bool:
        # a torn last line (no newline) must be cut before appending after it
        if not is_local(self.url) or not os.path.exists(local_path(self.url)):
            return False
        with open(local_path(self.url), "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def _rewrite(self) -> None:
        write_text_atomic(self.url, "".join(dumps(r) + "\n" for r in self._records))

    @property
    def records(self) -> list[dict]:
        return list(self._records)

    def append(self, record: dict) -> None:
        self._records.append(record)
        if is_local(self.url):
            path = local_path(self.url)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        else:
            self._rewrite()


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RunDir:
    """Paths of one run. `url` is a local folder or an fsspec URL."""

    url: str

    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    @property
    def config(self) -> str:
        return self.path("config.json")

    @property
    def metrics(self) -> str:
        return self.path("metrics.jsonl")

    @property
    def tb(self) -> str:
        return self.path("tb")

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    @property
    def analysis(self) -> str:
        return self.path("analysis")

    @property
    def state(self) -> str:
        return self.path("analysis", "state.json")

    @property
    def decision(self) -> str:
        return self.path("analysis", "decision.json")

    @property
    def curve(self) -> str:
        return self.path("analysis", "curve.png")

    @property
    def bundle(self) -> str:
        return self.path("bundle")

    @property
    def manifest(self) -> str:
        return self.path("bundle", "manifest.json")

    def expert(self, index: int, interval_key: str) -> "RunDir":
        """RUN/experts/<i>_<lo>_<hi>/ for interval key 'lo,hi'."""
        lo, hi = interval_key.split(",")
        return RunDir(self.path("experts", f"{index}_{lo}_{hi}"))

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.url)


def last(records: Iterable[dict], field: str, default=None):
    val = default
    for r in records:
        if field in r:
            val = r[field]
    return val
