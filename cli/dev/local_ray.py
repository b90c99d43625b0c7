"""A local Ray head on this machine, for `make ray-up` / `make ray-down` and the test suite.

`start()` runs `ray start --head --block` as a child in its own process group, with the
dashboard (which serves the Jobs API) bound to 127.0.0.1 on a free or given port, every other
Ray port chosen free (so several heads can share a machine), `RAY_AUTH_MODE=disabled`, and
Ray's temp dir (sessions, logs, sockets) under the state folder (`$LINEARSR_RAY_DIR`, by
default `runs/ray/`).
Because the temp dir is private, `ray.init()` elsewhere on the machine does not attach to this
head by accident. The head's address is written to `STATE/cluster.json`; `stop()` ends exactly
the process group it started (never `ray stop`, which kills every Ray on the machine).

Jobs run with the head's environment, whose PATH starts with this Python's bin folder, so a
job's `linearsr ...` / `python ...` entrypoint runs in the same virtualenv.

    python -m linearsr.dev.local_ray up [--port P] [--num-cpus N]
    python -m linearsr.dev.local_ray down
    python -m linearsr.dev.local_ray status
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import requests

from linearsr.cluster.head import DEFAULT_STATE_DIR, LocalCluster, attach, jobs_api_answers, state_path
from linearsr.core.util import pid_alive

log = logging.getLogger(__name__)

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the local Ray head's, the local S3 server's, the tests')."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ray_executable() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    found = beside if os.path.exists(beside) else shutil.which("ray")
    if not found:
        raise RuntimeError("the `ray` command is not installed beside this Python; run `make setup`")
    return found


def start(
    state_dir: str = DEFAULT_STATE_DIR,
    port: int | None = None,
    num_cpus: int | None = None,
    timeout: float = 120.0,
) -> LocalCluster:
    """Start a local head (or return the one already recorded in `state_dir`) and wait until
    its Jobs API answers. `num_cpus` sets the logical CPUs (default: Ray counts the cores)."""
    running = attach(state_dir)
    if running is not None:
        log.info("a local Ray head is already running: %s (pid %d)", running.jobs_address, running.pid)
        return running
    state_dir = os.path.abspath(state_dir)
    temp_dir = os.path.join(state_dir, "tmp")
    os.makedirs(temp_dir, exist_ok=True)
    if port is None:
        port = free_port()
    elif not _port_free(port):
        raise ValueError(f"port {port} on 127.0.0.1 is already in use; choose another Jobs API port or leave it out")
    if num_cpus is not None and num_cpus < 1:
        raise ValueError(f"num_cpus must be a whole number >= 1, got {num_cpus}")
    cmd = [
        _ray_executable(), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # no 30 s drain on SIGTERM: a local head has no Serve replicas to migrate
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)  # a head never attaches anywhere
    log_path = os.path.join(state_dir, "head.log")
    with open(log_path, "ab") as head_log:
        proc = subprocess.Popen(cmd, env=env, stdout=head_log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not jobs_api_answers(address, timeout=1.0):
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with code {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            _kill_group(proc.pid, timeout=10)
            raise TimeoutError(f"the local Ray head did not answer at {address} within {timeout:.0f} s; see {log_path}")
        time.sleep(0.3)
    cluster = LocalCluster(jobs_address=address, pid=proc.pid, state_dir=state_dir,
                           temp_dir=temp_dir, num_cpus=num_cpus)
    tmp = state_path(state_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(cluster), f, indent=2)
    os.replace(tmp, state_path(state_dir))
    log.info("local Ray head up: Jobs API at %s (pid %d, logs %s)", address, proc.pid, log_path)
    return cluster


def _stop_jobs(address: str) -> None:
    """Ask every job still running on the head to stop (best effort, a few seconds at most)."""
    try:
        jobs = requests.get(f"{address}/api/jobs/", timeout=5).json()
        for job in jobs:
            if job.get("status") in ("PENDING", "RUNNING") and job.get("submission_id"):
                requests.post(f"{address}/api/jobs/{job['submission_id']}/stop", timeout=5)
    except (requests.RequestException, ValueError):
        pass


def _kill_group(pid: int, timeout: float) -> None:
    """SIGTERM the `ray start --block` process (it drains and ends its children), then SIGKILL
    whatever is left of its process group after `timeout` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(state_dir: str = DEFAULT_STATE_DIR, timeout: float = 30.0) -> bool:
    """Stop the head recorded in `state_dir` (its jobs first). False when none was running."""
    try:
        with open(state_path(state_dir)) as f:
            cluster = LocalCluster(**json.load(f))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return False
    was_running = pid_alive(cluster.pid)
    if was_running:
        _stop_jobs(cluster.jobs_address)
        _kill_group(cluster.pid, timeout)
        log.info("local Ray head (pid %d) stopped", cluster.pid)
    os.remove(state_path(state_dir))
    return was_running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearsr.dev.local_ray",
                                     description="start/stop/show a local Ray head (Jobs API on 127.0.0.1)")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="where cluster.json, logs and Ray's temp dir live")
    parser.add_argument("--port", type=int, default=None, help="Jobs API (dashboard) port; default: a free one")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the head (default: the cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "up":
        try:
            cluster = start(args.state_dir, port=args.port, num_cpus=args.num_cpus)
        except (RuntimeError, TimeoutError, ValueError) as e:
            print(f"ray-up: error: {e}", file=sys.stderr)
            return 1
        print(f"Ray Jobs API: {cluster.jobs_address}\n  export RAY_ADDRESS={cluster.jobs_address}\n"
              f"  stop with `make ray-down`")
        return 0
    if args.action == "down":
        print("local Ray head stopped" if stop(args.state_dir) else "no local Ray head was running")
        return 0
    cluster = attach(args.state_dir)
    print(f"running: {cluster.jobs_address} (pid {cluster.pid})" if cluster else "no local Ray head is running")
    return 0 if cluster else 1


if __name__ == "__main__":
    sys.exit(main())
