"""The ESGF sidecar: watch a pretrain run, decide once, stop it, act.

    Sidecar(RUN).watch()        poll metrics.jsonl until a decision is due (knee confirmed,
                                divergence, or the run finished), write analysis/decision.json,
                                curve.png and the TensorBoard record; stop the pretrain job at the
                                knee (esgf.stop_at_knee) or on divergence, also when it diverged
                                before any usable checkpoint; then run the expert tree and write
                                the bundle.
    Sidecar(RUN).run_experts(d) fine-tune the tree level by level from decision `d`
                                (ckpt_analysis/tree.py), retry failures, export the leaves' best
                                checkpoints into RUN/bundle/.

Everything it does is recorded in analysis/state.json first, so a killed sidecar, restarted
with the same command, picks up where it stopped and never submits a job twice. One sidecar acts
on a run at a time: `watch` and `run_experts` hold the run's lease (ckpt_analysis/lease.py); a
second one is refused naming the holder, and one whose lease was taken over stops submitting.
The checkpoints it depends on (the decision's, the bundle's sources) are pinned against retention.
Exit codes: 0 bundle written, 1 an expert failed for good or no decision is possible.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

from linearsr.ckpt_analysis.config import esgf_from_config, flow_from_config, storage_from_config
from linearsr.ckpt_analysis.decision import Analysis, analyze, curve_from_records
from linearsr.ckpt_analysis.experts import JobTracker, assemble_bundle, checkpoint_complete, decision_token
from linearsr.ckpt_analysis.knee import detect_divergence
from linearsr.ckpt_analysis.lease import Lease
from linearsr.ckpt_analysis.report import log_stop, write_decision_outputs
from linearsr.ckpt_analysis.state import State
from linearsr.ckpt_analysis.tree import TreeRun
from linearsr.cluster.jobs import Jobs
from linearsr.core import storage
from linearsr.core.storage import exists, is_local, local_path, read_json, read_json_or_none, write_json
from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer.rundir import RunDir

log = logging.getLogger(__name__)


def absolute(url: str) -> str:
    """A local run path made absolute (jobs run in another working directory); URLs unchanged."""
    url = url.rstrip("/")
    return os.path.abspath(local_path(url)) if is_local(url) else url


def load_run_config(run: RunDir) -> dict:
    try:
        config = read_json(run.config)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run.config} does not exist: pass a run dir written by `linearsr train`") from None
    if not isinstance(config, dict):
        raise ValueError(f"{run.config} must hold a table of config sections")
    return config


def wait_for_run(run_url: str, pretrain_job: str | None, ray_address: str | None, poll_seconds: float,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    """Block until RUN/config.json exists (a sidecar may start before the trainer wrote it);
    a FileNotFoundError if the pretrain job ends first."""
    run = RunDir(absolute(run_url))
    jobs = Jobs(ray_address) if pretrain_job else None
    logged = False
    while not exists(run.config):
        info = jobs.info(pretrain_job) if jobs else None
        if jobs and (info is None or info.terminal):
            raise FileNotFoundError(f"{run.config} does not exist and the pretrain job {pretrain_job} has "
                                    f"{'ended' if info else 'no record on the cluster'}; check its log (`ray job logs {pretrain_job}`)")
        if not logged:
            log.info("waiting for the pretrain run to write %s", run.config)
            logged = True
        sleep(poll_seconds)


class Sidecar:
    def __init__(
        self,
        run_url: str,
        pretrain_job: str | None = None,
        ray_address: str | None = None,
        poll_seconds: float | None = None,
        jobs: Jobs | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.run = RunDir(absolute(run_url))
        self.config = load_run_config(self.run)
        self.cfg = esgf_from_config(self.config)
        storage.configure(storage_from_config(self.config))  # the run's retry budget, for the sidecar's own I/O
        self.flow = flow_from_config(self.config)
        self.budget = (self.config.get("run") or {}).get("steps")
        self.poll = poll_seconds or self.cfg.poll_seconds
        self.ray_address = ray_address or self.cfg.ray_address or None
        self.sleep = sleep
        self._jobs = jobs
        self.state = State(self.run)
        self.lease: Lease | None = None
        if pretrain_job:  # saved with the next state change, once the cluster has answered
            self.state.data["pretrain_job"] = pretrain_job

    @property
    def jobs(self) -> Jobs:
        if self._jobs is None:
            self._jobs = Jobs(self.ray_address)
        return self._jobs

    @property
    def pretrain_job(self) -> str | None:
        return self.state.data["pretrain_job"]

    @contextlib.contextmanager
    def leased(self) -> Iterator[None]:
        """Hold the run's lease while acting (re-entrant: watch -> run_experts)."""
        if self.lease is not None:
            yield
            return
        with Lease(self.run.url, self.cfg.lease_seconds) as self.lease:
            try:
                yield
            finally:
                self.lease = None

    def _guard(self) -> None:
        if self.lease is not None:
            self.lease.check()

    # ------------------------------------------------------------------ deciding

    def run_finished(self, records: list[dict]) -> bool:
        """The pretrain run will add no more validations: its step budget is used up, or its
        Ray job (when known) has ended."""
        run_cfg, val_cfg = self.config.get("run") or {}, self.config.get("validation") or {}
        steps = [r["step"] for r in records if r.get("step") is not None]
        if steps and "steps" in run_cfg and max(steps) + val_cfg.get("every", 1) > run_cfg["steps"]:
            return True
        if self.pretrain_job:
            try:
                info = self.jobs.info(self.pretrain_job)
            except ConnectionError as e:
                log.warning("cannot tell whether the pretrain job has ended: %s", e)
                return False
            if info is None:  # unknown, not finished: never decide on a partial curve because of it
                if self.state.data.get("pretrain_unknown") != self.pretrain_job:
                    self.state.data["pretrain_unknown"] = self.pretrain_job
                    self.state.event(
                        f"the Ray cluster has no record of the pretrain job {self.pretrain_job} (was its head "
                        "restarted?); no decision on a partial curve: watching metrics.jsonl for a resubmitted "
                        "pretrain (`linearsr submit` on the same run resumes it; pass its id with --pretrain-job), "
                        "or decide with the validations there are: `linearsr analyze RUN --finished`", logging.WARNING)
                    self.state.save()
                return False
            return info.terminal
        return False

    def analyze(self, finished: bool | None = None) -> Analysis:
        records = self.run.read_metrics()
        if finished is None:
            finished = self.run_finished(records)
        return analyze(records, self.cfg, self.flow, self.budget, finished=finished, checkpoint_exists=checkpoint_complete)

    def decision(self) -> dict | None:
        """The decision already taken for this run (analysis/decision.json), if any."""
        return read_json_or_none(self.run.decision)

    def record_decision(self, analysis: Analysis) -> dict:
        """Take the analysis' decision: decision.json, state.json, the picture and TensorBoard."""
        assert analysis.decision is not None
        self.save_decision(analysis.decision)
        write_decision_outputs(self.run, analysis, analysis.decision)
        return analysis.decision

    def save_decision(self, decision: dict) -> None:
        """Pin the chosen checkpoint (retention keeps it), then write decision.json and state.json."""
        ckpt.pin(decision["checkpoint"], by=self.run.decision, why="the ESGF decision: every expert starts from it")
        write_json(self.run.decision, decision)
        self.state.data["decision"] = {k: decision.get(k) for k in ("checkpoint", "knee_step", "confirmed_at", "diverged_at", "method")}
        self.state.event(f"decision: {decision['checkpoint']} ({decision['reason']})")
        self.state.save()

    def stop_pretrain(self, kind: str, reason: str) -> None:
        """Stop the pretrain job (once) if it is known and still running, recording why (state.json,
        the log, TensorBoard). kind: "knee" or "divergence"; each is gated by its own setting."""
        job = self.pretrain_job
        wanted = self.cfg.stop_at_knee if kind == "knee" else self.cfg.stop_pretrain_on_divergence
        if not (wanted and job) or self.state.data["pretrain_stopped"]:
            return
        info = self.jobs.info(job)
        if info is None or info.terminal:
            return
        self.jobs.stop(job)
        steps = [r["step"] for r in self.run.read_metrics() if r.get("step") is not None]
        stop = {"job": job, "kind": kind, "reason": reason, "at": time.time(), "last_step": max(steps, default=None)}
        self.state.data["pretrain_stopped"] = stop
        self.state.event(f"stopped the pretrain job {job} after step {stop['last_step']}: {reason}",
                         logging.INFO if kind == "knee" else logging.WARNING)
        self.state.save()
        log_stop(self.run, stop)

    def _check_pretrain_divergence(self) -> None:
        """While experts run, a pretrain run that diverges later is stopped too."""
        if not (self.cfg.stop_pretrain_on_divergence and self.pretrain_job) or self.state.data["pretrain_stopped"]:
            return
        curve = curve_from_records(self.run.read_metrics())
        div = detect_divergence(curve.steps, curve.val_loss_raw or curve.val_loss, self.cfg.divergence, curve.train_loss)
        if div is not None:
            self.stop_pretrain("divergence", f"divergence began at step {div.step}: {div.detail}")

    def watch(self) -> int:
        """Poll until a decision is due, take it once, then act on it. Returns the exit code."""
        with self.leased():
            _ = self.jobs  # an unreachable cluster fails now, not after hours of waiting for the knee
            return self._watch()

    def _watch(self) -> int:
        decision, last_reason = self.decision(), None
        if decision is not None:
            log.info("decision already taken: %s (%s)", decision["checkpoint"], decision["reason"])
        while decision is None:
            records = self.run.read_metrics()
            finished = self.run_finished(records)
            analysis = analyze(records, self.cfg, self.flow, self.budget, finished=finished,
                               checkpoint_exists=checkpoint_complete)
            if analysis.decision is not None:
                decision = self.record_decision(analysis)
                break
            if analysis.reason != last_reason:
                self.state.event(f"no decision yet: {analysis.reason}")
                self.state.save()
                last_reason = analysis.reason
            if analysis.divergence is not None and analysis.knee is None:
                # diverged before any usable checkpoint: nothing to wait for
                self.stop_pretrain("divergence", f"divergence began at step {analysis.divergence.step} before any "
                                                 f"usable checkpoint: {analysis.divergence.detail}")
                finished = finished or bool(self.state.data["pretrain_stopped"])
            if finished:
                self.state.event(f"the pretrain run has ended and no checkpoint can be chosen: {analysis.reason}", logging.ERROR)
                self.state.save()
                return 1
            self.sleep(self.poll)
        if decision.get("method") == "knee":
            self.stop_pretrain("knee", f"the knee is confirmed at step {decision.get('confirmed_at')} "
                                       f"(knee step {decision.get('knee_step')}); its workers go to the experts")
        elif decision.get("diverged_at") is not None:
            self.stop_pretrain("divergence", f"divergence began at step {decision['diverged_at']}: "
                                             f"{(decision.get('divergence') or {}).get('detail', '')}")
        return self.run_experts(decision)

    # ------------------------------------------------------------------ acting

    def run_experts(self, decision: dict, retry_failed: bool = False) -> int:
        """Fine-tune the tree from decision['checkpoint'] and write the bundle. Exit code."""
        with self.leased():
            return self._run_experts(decision, retry_failed)

    def _run_experts(self, decision: dict, retry_failed: bool) -> int:
        if (self.state.data["bundle"] or {}).get("status") == "written" and not retry_failed:
            log.info("bundle already written: %s", self.state.data["bundle"]["path"])
            return 0
        tracker = JobTracker(self.jobs, self.state, self.run, self.cfg, self.sleep, token=decision_token(decision),
                             guard=self._guard)
        self._compare_code(decision["checkpoint"])
        if retry_failed:
            tracker.retry_failed([k for k, rec in self.state.jobs.items() if rec["status"] == "failed"])
        tree = TreeRun(self.run, self.config, self.cfg, self.flow, self.state, tracker, self.poll,
                       on_poll=self._check_pretrain_divergence)
        try:
            leaves = tree.run(decision)
        except ValueError as e:  # e.g. per-interval init without that interval's curve
            return self._no_bundle(str(e))
        if leaves is None:
            return self._fail(tree.failed, "expert fine-tune(s) failed")
        extra = {"sampling": {"shift": self.flow.shift}, "tree": tree.manifest_tree(leaves),
                 "decision": {k: decision.get(k) for k in ("method", "knee_step", "checkpoint", "checkpoint_step")}}
        for e in leaves:
            ckpt.pin(e.checkpoint, by=self.run.bundle, why=f"the source of the bundle's expert {e.node}")
        try:
            url = assemble_bundle(self.run, self.config, leaves, decision.get("knee_step"), extra)
        except (ValueError, FileNotFoundError) as e:
            return self._no_bundle(str(e))
        self.state.data["bundle"] = {"status": "written", "path": url,
                                     "experts": [{"interval": e.interval.key, "node": e.node, "checkpoint": e.checkpoint}
                                                 for e in leaves]}
        self.state.event(f"bundle written: {url} ({len(leaves)} experts)")
        self.state.save()
        return 0

    def _no_bundle(self, error: str) -> int:
        self.state.data["bundle"] = {"status": "failed", "failed": [], "error": error}
        self.state.event(f"no bundle written: {error}", logging.ERROR)
        self.state.save()
        return 1

    def _compare_code(self, ckpt_url: str) -> None:
        """The expert jobs carry this sidecar's linearsr; say so when the pretrain ran other code."""
        from linearsr.core.codeid import code_id
        from linearsr.trainer.checkpoint import read_meta

        try:
            theirs = read_meta(ckpt_url).get("code")
        except (FileNotFoundError, ValueError):
            return
        if theirs and theirs != code_id():
            self.state.event(f"the experts run linearsr code {code_id()} (this sidecar's); the knee checkpoint was "
                             f"trained by code {theirs}: run the sidecar from the pretrain's checkout to fine-tune "
                             "with the same code", logging.WARNING)

    def _fail(self, keys: list[str], what: str) -> int:
        recs = [self.state.jobs[k] for k in keys]
        detail = "; ".join(
            f"{r['name']} (interval {r['interval']}) after {len(r['attempts'])} attempt(s), last "
            f"{r['attempts'][-1]['submission_id'] if r['attempts'] else '-'}: "
            f"{(r['attempts'][-1]['message'] if r['attempts'] else '') or 'no message'}" for r in recs)
        self._no_bundle(f"{what}: {detail}")
        self.state.data["bundle"]["failed"] = [r["interval"] for r in recs]
        self.state.event(f"after fixing the cause: `linearsr experts {self.run.url} --retry-failed` gives "
                         f"{', '.join(r['name'] for r in recs)} another round (finished experts are kept)", logging.ERROR)
        self.state.save()
        return 1
