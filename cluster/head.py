"""Where the library finds the local Ray head that `make ray-up` started (linearsr.dev.local_ray
starts and stops it): its address is in STATE/cluster.json (`$LINEARSR_RAY_DIR`, by default
`runs/ray/`), trusted only while its process lives and its Jobs API answers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import requests

from linearsr.core.util import pid_alive

DEFAULT_STATE_DIR = os.environ.get("LINEARSR_RAY_DIR") or os.path.join("runs", "ray")
STATE_FILE = "cluster.json"


@dataclass(frozen=True)
class LocalCluster:
    """A running local head: `jobs_address` is the Jobs API URL (http://127.0.0.1:PORT)."""

    jobs_address: str
    pid: int  # the `ray start --block` process; its process group holds every Ray process
    state_dir: str
    temp_dir: str
    num_cpus: int | None


def jobs_api_answers(address: str, timeout: float = 2.0) -> bool:
    """True when the Jobs API at `address` (http://host:port) answers its version request."""
    try:
        return requests.get(f"{address}/api/version", timeout=timeout).ok
    except requests.RequestException:
        return False


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def attach(state_dir: str = DEFAULT_STATE_DIR) -> LocalCluster | None:
    """The head recorded in STATE/cluster.json if it is still running and answering, else None."""
    try:
        with open(state_path(state_dir)) as f:
            cluster = LocalCluster(**json.load(f))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    if not pid_alive(cluster.pid) or not jobs_api_answers(cluster.jobs_address):
        return None
    return cluster
