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
Every read and write goes through linearsr.core.storage (retries, atomic writes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable

from linearsr.core.storage import (
    dumps,
    is_local,
    join,
    loads,
    local_path,
    read_text,
    write_text_atomic,
)

# metrics.jsonl field names (more may be added, none renamed)
METRIC_FIELDS = (
    "step", "samples", "wall_time", "train_loss", "val_loss", "val_loss_by_interval",
    "lr", "grad_norm", "samples_per_s", "data_skips", "checkpoint",
)


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
