"""RUN/analysis/state.json: the sidecar's memory, so a killed and restarted sidecar resumes.

Written atomically (temp + rename locally, one PUT on object stores) before and after every
job submission. Layout (operators read it too):

    {"run": URL, "pretrain_job": id | null,
     "pretrain_stopped": {job, kind: "knee" | "divergence", reason, at, last_step} | null,
     "decision": {checkpoint, knee_step, confirmed_at, diverged_at, method},
     "jobs": {"L1-0": {"name", "interval": "lo,hi", "run": URL, "init": URL, "steps", "status",
                       "budget": attempts allowed, "attempts": [{"submission_id", "status",
                       "submitted_at", "start_time", "end_time", "message"}]}, ..., "control": {...}},
     "tree": {"split", "edges", "init", "nodes": {"L1-0": {"level", "index", "interval",
              "parent": "decision" | node id, "init", "job", "status", "best": {checkpoint, step,
              val_loss} | null}, ...}, "control": {run, init, steps, status, best} (optional)},
     "progress": "2/4 succeeded, 2 running",
     "bundle": {"status": "written" | "failed", "path" | "failed": [...], "error"} | null,
     "events": [{"at", "event"}, ...]   (the last 200)}

Job record status: waiting -> submitting -> running -> succeeded | failed. An attempt whose
status is SUBMITTING was recorded before Ray was asked; a restart re-submits it under the same
deterministic submission id, which Ray answers with the existing job if the first call got through.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from linearsr.core.storage import read_json_or_none, write_json
from linearsr.trainer.rundir import RunDir

log = logging.getLogger(__name__)

MAX_EVENTS = 200


class State:
    """The state file as a dict (`self.data`) with atomic save."""

    def __init__(self, run: RunDir):
        self.run = run
        self.data: dict[str, Any] = read_json_or_none(run.state) or {}
        self.data.setdefault("run", run.url)
        self.data.setdefault("pretrain_job", None)
        self.data.setdefault("pretrain_stopped", None)
        self.data.setdefault("decision", None)
        self.data.setdefault("jobs", {})
        self.data.setdefault("bundle", None)
        self.data.setdefault("events", [])

    @property
    def jobs(self) -> dict[str, dict]:
        return self.data["jobs"]

    def event(self, text: str, level: int = logging.INFO) -> None:
        """Log a line and keep it in the state's event list (saved with the next save())."""
        log.log(level, text)
        self.data["events"] = (self.data["events"] + [{"at": time.time(), "event": text}])[-MAX_EVENTS:]

    def save(self) -> None:
        self.data["updated_at"] = time.time()
        write_json(self.run.state, self.data)
