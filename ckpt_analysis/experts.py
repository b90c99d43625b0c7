"""Fine-tune jobs: submit Ray Jobs, track them, retry failures; each fine-tune's best checkpoint;
RUN/bundle/ from the leaves' best checkpoints.

Each job runs the trainer's fine-tune mode (the contract in docs/architecture.md):

    linearsr train --config RUN/config.json --run RUN/experts/<node>_<lo>_<hi> --init CKPT \
        --t-interval=<lo>,<hi> [run.steps=N] [esgf.experts.overrides ...]

under the deterministic submission id `<run-name>-<decision token>-<key>-try-<n>`, where the key
names the tree node ("L2-3") or the equal-compute control ("control"); ckpt_analysis/tree.py
decides which jobs run when.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from linearsr.ckpt_analysis.config import ESGFConfig
from linearsr.ckpt_analysis.decision import curve_from_records
from linearsr.ckpt_analysis.knee import detect_divergence
from linearsr.ckpt_analysis.state import State
from linearsr.cluster.jobs import FORWARD_ENV, JobInfo, Jobs
from linearsr.core import storage
from linearsr.core.storage import read_json
from linearsr.model.flow import Interval, check_partition
from linearsr.trainer.rundir import RunDir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class JobSpec:
    """One fine-tune job: `key` names it in state.json ("L2-3", "control"); `steps` is its step
    budget (0 = the trainer's own); `workers` its (num_workers, grad_accum) when shared; `extra`
    overrides after esgf.experts.overrides (the control's)."""

    key: str
    name: str
    interval: Interval
    run_url: str
    init: str
    steps: int = 0
    workers: tuple[int, int] | None = None
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chosen:
    """A fine-tune's best checkpoint: what goes into the bundle for one interval."""

    interval: Interval
    checkpoint: str
    step: int
    val_loss: float
    node: str = ""


def run_name(run: RunDir) -> str:
    name = os.path.basename(run.url.rstrip("/")) or "run"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def decision_token(decision: dict) -> str:
    """Six hex digits naming one decision: expert job ids carry it, so a run dir that was wiped
    and run again on the same long-lived Ray head never adopts the old run's finished jobs,
    while a restarted sidecar (same decision.json) finds its own jobs again."""
    text = f"{decision.get('decided_at')}|{decision.get('checkpoint')}"
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def submission_id(run: RunDir, key: str, attempt: int, token: str = "") -> str:
    return f"{run_name(run)}-{token + '-' if token else ''}{key}-try-{attempt}"


def entrypoint(spec: JobSpec, run: RunDir, cfg: ESGFConfig) -> str:
    args = shlex.split(cfg.experts.command) + [
        "--config", run.config, "--run", spec.run_url, "--init", spec.init, f"--t-interval={spec.interval.key}"]
    return shlex.join(args + cfg.experts.trainer_overrides(spec.steps, spec.workers) + list(spec.extra))


class JobTracker:
    """Submits and follows a set of jobs until each has succeeded or used up its attempts.
    Every change is saved to state.json before the next Ray call."""

    def __init__(self, jobs: Jobs, state: State, run: RunDir, cfg: ESGFConfig, sleep: Callable[[float], None] = time.sleep,
                 token: str = "", guard: Callable[[], None] | None = None):
        self.jobs, self.state, self.rundir, self.cfg, self.sleep = jobs, state, run, cfg, sleep
        self.token = token
        self.guard = guard or (lambda: None)  # raises when this sidecar may no longer act (its lease was taken)
        self.env = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}

    def add(self, spec: JobSpec) -> dict:
        rec = self.state.jobs.get(spec.key)
        if rec is None:
            rec = self.state.jobs[spec.key] = {
                "name": spec.name, "interval": spec.interval.key, "run": spec.run_url, "init": spec.init,
                "steps": spec.steps, "status": "waiting", "budget": 1 + self.cfg.experts.max_retries, "attempts": []}
        elif rec["init"] != spec.init or rec["run"] != spec.run_url:
            raise ValueError(f"state.json already tracks {spec.key} for {rec['init']} -> {rec['run']}; "
                             f"remove {self.rundir.state} to start the experts over")
        return rec

    def retry_failed(self, keys: list[str]) -> None:
        """Give every failed job a fresh set of attempts (`linearsr experts --retry-failed`)."""
        for key in keys:
            rec = self.state.jobs[key]
            if rec["status"] == "failed":
                rec["budget"] = len(rec["attempts"]) + 1 + self.cfg.experts.max_retries
                rec["status"] = "waiting"
                self.state.event(f"{rec['name']}: failed before; {1 + self.cfg.experts.max_retries} more attempt(s) allowed")
        self.state.save()

    def _submit(self, key: str, spec: JobSpec, attempt: dict | None = None) -> None:
        self.guard()
        rec = self.state.jobs[key]
        if attempt is None:  # a new attempt: record the intent first
            attempt = {"submission_id": submission_id(self.rundir, key, len(rec["attempts"]) + 1, self.token),
                       "status": "SUBMITTING", "submitted_at": time.time(),
                       "start_time": None, "end_time": None, "message": ""}
            rec["attempts"].append(attempt)
            rec["status"] = "submitting"
            self.state.save()
        info = self.jobs.submit(
            attempt["submission_id"], entrypoint(spec, self.rundir, self.cfg),
            num_cpus=self.cfg.experts.num_cpus, env_vars=self.env,
            metadata={"linearsr_run": self.rundir.url, "linearsr_job": key})
        self._update(rec, attempt, info)
        rec["status"] = "running"
        self.state.event(f"{rec['name']}: submitted {attempt['submission_id']} "
                         f"(try {len(rec['attempts'])} of {rec['budget']})")
        self.state.save()

    @staticmethod
    def _update(rec: dict, attempt: dict, info: JobInfo) -> None:
        attempt.update(status=info.status, start_time=info.start_time, end_time=info.end_time, message=info.message)

    def _poll(self, key: str) -> bool:
        """Refresh one running job; True when its record changed."""
        rec = self.state.jobs[key]
        attempt = rec["attempts"][-1]
        info = self.jobs.info(attempt["submission_id"])
        if info is None:  # the cluster forgot it (its head restarted): not the job's fault
            attempt.update(status="LOST", end_time=time.time(),
                           message="the Ray cluster has no record of this job (was its head restarted?)")
            rec["budget"] += 1  # resubmitted without spending one of its retries
            rec["status"] = "waiting"
            self.state.event(f"{rec['name']}: the Ray cluster lost {attempt['submission_id']} (was its head restarted?); "
                             "resubmitting it, not counted against its retries (its run dir resumes from its last "
                             "complete checkpoint)", logging.WARNING)
            return True
        elif info.status == attempt["status"] and not info.terminal:
            return False
        else:
            self._update(rec, attempt, info)
        if attempt["status"] == "SUCCEEDED":
            rec["status"] = "succeeded"
            self.state.event(f"{rec['name']}: succeeded ({attempt['submission_id']})")
        elif attempt["status"] in ("FAILED", "STOPPED"):
            tail = self.jobs.logs_tail(attempt["submission_id"], 15)
            attempt["log_tail"] = tail
            left = rec["budget"] - len(rec["attempts"])
            rec["status"] = "waiting" if left > 0 else "failed"
            self.state.event(
                f"{rec['name']}: {attempt['status']} ({attempt['submission_id']}: {attempt['message'] or 'no message'}); "
                + (f"retrying ({left} attempt(s) left)" if left > 0 else "no attempts left")
                + (f"\n{tail}" if tail else ""),
                logging.WARNING if left > 0 else logging.ERROR)
        else:
            self.state.event(f"{rec['name']}: {attempt['status']} ({attempt['submission_id']})")
        return True

    def progress(self, keys: list[str]) -> str:
        counts: dict[str, int] = {}
        for key in keys:
            counts[self.state.jobs[key]["status"]] = counts.get(self.state.jobs[key]["status"], 0) + 1
        order = ("succeeded", "running", "submitting", "waiting", "failed")
        return f"{counts.get('succeeded', 0)}/{len(keys)} succeeded" + "".join(
            f", {counts[s]} {s}" for s in order[1:] if counts.get(s))

    def run(self, specs: list[JobSpec], poll_seconds: float, on_poll: Callable[[], None] | None = None,
            wait_for: list[str] | None = None, max_connection_errors: int = 20) -> dict[str, str]:
        """Submit (at most `experts.parallel` at once), follow and retry the jobs until each of
        `wait_for` (default: all) has succeeded or failed; returns key -> status of every job.
        The others keep running (a later call follows them). `on_poll` runs once per poll."""
        for spec in specs:
            self.add(spec)
        keys = [s.key for s in specs]
        waited = wait_for if wait_for is not None else keys
        by_key = {s.key: s for s in specs}
        errors, last_progress = 0, None
        while True:
            try:
                for key in keys:
                    rec = self.state.jobs[key]
                    if rec["status"] == "submitting":  # interrupted mid-submission: Ray decides if it got through
                        self._submit(key, by_key[key], rec["attempts"][-1])
                    elif rec["status"] == "running":
                        if self._poll(key):
                            self.state.save()
                limit = self.cfg.experts.parallel or len(keys)
                for key in keys:
                    rec = self.state.jobs[key]
                    active = sum(self.state.jobs[k]["status"] in ("running", "submitting") for k in keys)
                    if rec["status"] == "waiting" and active < limit:
                        self._submit(key, by_key[key])
                if on_poll is not None:
                    on_poll()
                errors = 0
            except ConnectionError as e:
                errors += 1
                if errors >= max_connection_errors:
                    raise
                log.warning("%s (try %d of %d; retrying in %.0f s)", e, errors, max_connection_errors, poll_seconds)
            progress = self.progress(keys)
            if progress != last_progress:
                self.state.data["progress"] = progress
                self.state.event(f"jobs: {progress}")
                self.state.save()
                last_progress = progress
            if all(self.state.jobs[k]["status"] in ("succeeded", "failed") for k in waited):
                return {k: self.state.jobs[k]["status"] for k in keys}
            self.sleep(poll_seconds)


def best_checkpoint(run: RunDir, interval: Interval, cfg: ESGFConfig, node: str = "") -> "Chosen":
    """A fine-tune run's checkpoint with the lowest validation loss on its interval, never one at
    or after divergence (EMA weights' loss when the run keeps them)."""
    curve = curve_from_records(run.read_metrics())
    vals = curve.by_interval.get(interval.key) or curve.val_loss
    div = detect_divergence(curve.steps, curve.val_loss_raw or vals, cfg.divergence, curve.train_loss)
    candidates = [(v, s) for s, v in zip(curve.steps, vals)
                  if s in curve.checkpoints and math.isfinite(v) and (div is None or s < div.step)
                  and checkpoint_complete(curve.checkpoints[s])]
    if not candidates:
        where = f" before its divergence at step {div.step}" if div else ""
        raise ValueError(f"the fine-tune in {run.url} has no checkpoint with a finite val loss{where}; "
                         "see its metrics.jsonl and job log")
    v, s = min(candidates)
    return Chosen(interval, curve.checkpoints[s], s, v, node)


def checkpoint_complete(ckpt_url: str) -> bool:
    """The trainer's completeness marker is there (an interrupted save is never used)."""
    from linearsr.trainer.checkpoint import is_complete

    return is_complete(ckpt_url)


def _default_export(ckpt_url: str, out_prefix: str) -> None:
    from linearsr.trainer.export import export_checkpoint

    export_checkpoint(ckpt_url, out_prefix)


def _default_write_bundle(bundle_dir: str, **kw) -> None:
    from linearsr.model.bundle import write_bundle

    write_bundle(bundle_dir, **kw)


def assemble_bundle(
    run: RunDir,
    config: dict,
    experts: list[Chosen],
    knee_step: int | None,
    extra: dict | None = None,
    export: Callable[[str, str], None] | None = None,
    write_bundle: Callable[..., None] | None = None,
) -> str:
    """Export each expert's checkpoint (EMA weights when it has them) and write RUN/bundle/
    (manifest written last, so a bundle without every interval never has a manifest).
    `extra`: more manifest fields (the tree, the sampling shift). `export` / `write_bundle`
    default to the trainer's and the model's. Returns the bundle URL."""
    export = export or _default_export
    write_bundle = write_bundle or _default_write_bundle
    check_partition([e.interval for e in experts])
    # the bundle's model config is the one its experts trained with (their exports carry it): the run's
    # config.json as the sidecar first read it may predate what the trainer resolved (model.tag_set)
    model_config = config.get("model") or {}
    with tempfile.TemporaryDirectory(prefix="linearsr-bundle-") as tmp:
        entries = []
        for i, e in enumerate(experts):
            log.info("expert %d %s: exporting step %d (val loss %.4g) from %s", i, e.interval, e.step, e.val_loss, e.checkpoint)
            export(e.checkpoint, os.path.join(tmp, f"expert_{i}"))
            meta = read_json(os.path.join(tmp, f"expert_{i}.json"))
            weights, model_config = meta.get("weights"), meta.get("model") or model_config
            entries.append({"interval": [e.interval.lo, e.interval.hi], "weights": f"expert_{i}.safetensors",
                            "val_loss": e.val_loss, "node": e.node, "checkpoint": e.checkpoint, "step": e.step,
                            "weights_from": weights})
        write_bundle(tmp, experts=entries, model_config=model_config, knee_step=knee_step, tagger=None,
                     extra=extra)
        storage.upload_dir(tmp, run.bundle, [n for n in sorted(os.listdir(tmp)) if n != MANIFEST])
        storage.put_file(os.path.join(tmp, MANIFEST), storage.join(run.bundle, MANIFEST))  # last
    return run.bundle
