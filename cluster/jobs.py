"""A thin wrapper over Ray's Jobs API (submit, status, stop, logs, wait) with one-line errors.

The address is the Jobs API URL of a cluster's head (its dashboard, `http://HOST:8265`).
It is taken, in order, from the `address` argument, the `RAY_ADDRESS` environment variable,
or the head that `make ray-up` recorded in `runs/ray/cluster.json`. (Ray's own client lets
RAY_ADDRESS override an explicit address; here the explicit one wins.)

Submissions are idempotent: `submit(submission_id, ...)` with an id Ray already knows returns
that job instead of starting a second one, so a caller that uses deterministic ids (the
sidecar: `<run>-expert-<i>-try-<n>`) can never run a job twice after a restart.

Every job carries the code of the `linearsr` package that submits it (Ray `py_modules`, put
first on the job's PYTHONPATH, inherited by its Ray Train workers), and its entrypoint is
`python -m linearsr ...` (`command()`): the cluster runs exactly the code that was checked
and submitted, whatever version of LinearSR its nodes have installed, or none. The nodes
need only the dependencies (`pip install 'linearsr[gpu]'` pins them).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import requests

from linearsr.cluster import head as local
from linearsr.core.codeid import PACKAGE, code_id, package_files

log = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The environment a job or a Ray Train worker gets from the process that starts it, to reach the
# same storage and run the same way. Credentials are never forwarded (a cluster node has its
# own), so they cannot leak into Ray's job records.
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
               "RAY_AUTH_MODE", "DS_ACCELERATOR", "RAY_USAGE_STATS_ENABLED", "HF_HUB_OFFLINE")
_env_lock = threading.Lock()


@dataclass(frozen=True)
class JobInfo:
    """What the sidecar and the CLI need to know about one job. Times are seconds since the epoch."""

    submission_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    entrypoint: str
    message: str = ""
    start_time: float | None = None
    end_time: float | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def command(*args: str) -> str:
    """The shell command that runs `linearsr ARGS...` in a job, from the shipped package."""
    return shlex.join(["python", "-m", PACKAGE, *args])


def stage_package(dest: str) -> str:
    """Copy the running `linearsr` package (`codeid.package_files()`) into DEST/linearsr, laid
    out as it imports; returns that folder, which Ray ships as a `py_modules` entry."""
    root = os.path.join(dest, PACKAGE)
    for rel, src in package_files():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(root, rel))
    return root


def resolve_address(address: str | None = None, state_dir: str = local.DEFAULT_STATE_DIR) -> str:
    """The Jobs API URL to use: `address`, else RAY_ADDRESS, else the `make ray-up` head."""
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if not address:
        cluster = local.attach(state_dir)
        if cluster is None:
            raise ConnectionError("no Ray cluster given: start one with `make ray-up` or set RAY_ADDRESS")
        address = cluster.jobs_address
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def _unreachable(address: str) -> ConnectionError:
    return ConnectionError(
        f"cannot reach the Ray cluster at {address}: start one with `make ray-up` or set RAY_ADDRESS"
    )


@contextmanager
def _without_ray_env() -> Iterator[None]:
    """Ray's client replaces an explicit address with RAY_ADDRESS; hide it while constructing."""
    names = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    with _env_lock:
        saved = {n: os.environ.pop(n) for n in names if n in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


class Jobs:
    """Client of one cluster's Jobs API. Every method raises ConnectionError (one sentence naming
    the address and the fix) when the cluster cannot be reached."""

    def __init__(self, address: str | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        try:
            with _without_ray_env():
                self._client = JobSubmissionClient(self.address)
        except (ConnectionError, requests.RequestException):
            raise _unreachable(self.address) from None
        except RuntimeError as e:  # something answers there, but not a Ray Jobs API
            raise ConnectionError(
                f"{self.address} does not answer as a Ray Jobs API ({str(e).splitlines()[0]}); "
                "give the head's dashboard URL, e.g. http://127.0.0.1:8265"
            ) from None

    @contextmanager
    def _call(self) -> Iterator[None]:
        try:
            yield
        except (ConnectionError, requests.ConnectionError, requests.Timeout):
            raise _unreachable(self.address) from None

    def info(self, submission_id: str) -> JobInfo | None:
        """The job with this submission id, or None when Ray has no such job."""
        with self._call():
            try:
                d = self._client.get_job_info(submission_id)
            except RuntimeError as e:
                if "does not exist" in str(e) or "status code 404" in str(e):
                    return None
                raise
        return JobInfo(
            submission_id=d.submission_id or submission_id,
            status=str(d.status),
            entrypoint=d.entrypoint,
            message=d.message or "",
            start_time=_seconds(d.start_time),
            end_time=_seconds(d.end_time),
            metadata=dict(d.metadata or {}),
        )

    def submit(
        self,
        submission_id: str,
        entrypoint: str,
        *,
        num_cpus: float | None = None,
        env_vars: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        runtime_env: dict | None = None,
        ship_code: bool = True,
    ) -> JobInfo:
        """Submit `entrypoint` (a shell command) under `submission_id`, or return the job that
        already has this id. A different command under the same id is an error: the id belongs
        to another run. `ship_code`: the job imports this process's `linearsr` package (see the
        module's docstring)."""
        existing = self.info(submission_id)
        if existing is not None:
            if existing.entrypoint != entrypoint:
                raise ValueError(
                    f"Ray job {submission_id!r} already exists with another command ({existing.entrypoint!r}); "
                    "use another run name or delete that job with `ray job delete`"
                )
            log.info("job %s already submitted (%s); not submitting it again", submission_id, existing.status)
            return existing
        runtime_env = dict(runtime_env or {})
        if env_vars:
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
        with tempfile.TemporaryDirectory(prefix="linearsr-code-") as tmp, self._call():
            if ship_code:  # uploaded by submit_job (once per content hash), so tmp may go after it
                runtime_env["py_modules"] = [stage_package(tmp), *runtime_env.get("py_modules", [])]
                metadata = {**(metadata or {}), "linearsr_code": code_id()}
            self._client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                entrypoint_num_cpus=num_cpus,
                runtime_env=runtime_env or None,
                metadata=metadata,
            )
        log.info("submitted job %s: %s%s", submission_id, entrypoint, f" (linearsr code {code_id()})" if ship_code else "")
        info = self.info(submission_id)
        assert info is not None, submission_id
        return info

    def status(self, submission_id: str) -> str:
        info = self.info(submission_id)
        if info is None:
            raise ValueError(f"the Ray cluster at {self.address} has no job {submission_id!r}")
        return info.status

    def stop(self, submission_id: str) -> bool:
        """Ask a job to stop; True if it was running."""
        with self._call():
            return bool(self._client.stop_job(submission_id))

    def logs_tail(self, submission_id: str, lines: int = 20) -> str:
        """The last `lines` lines of a job's output ('' when it has none yet)."""
        with self._call():
            try:
                text = self._client.get_job_logs(submission_id)
            except RuntimeError:
                return ""
        return "\n".join(text.rstrip("\n").split("\n")[-lines:])

    def list(self, prefix: str = "") -> list[JobInfo]:
        """All jobs whose submission id starts with `prefix`, oldest first."""
        with self._call():
            details = self._client.list_jobs()
        jobs = [
            JobInfo(d.submission_id, str(d.status), d.entrypoint, d.message or "",
                    _seconds(d.start_time), _seconds(d.end_time), dict(d.metadata or {}))
            for d in details
            if d.submission_id and d.submission_id.startswith(prefix)
        ]
        return sorted(jobs, key=lambda j: j.start_time or 0.0)

    def wait(self, submission_id: str, timeout: float | None = None, poll: float = 1.0) -> JobInfo:
        """Block until the job reaches a terminal status; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.info(submission_id)
            if info is None:
                raise ValueError(f"the Ray cluster at {self.address} has no job {submission_id!r}")
            if info.terminal:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {submission_id} is still {info.status} after {timeout:.0f} s")
            time.sleep(poll)
