"""One sidecar per run: a lease in RUN/analysis/lease.json, renewed by a heartbeat.

    {"holder": "host:pid:token", "host", "pid", "started_at", "heartbeat_at", "expires_at"}

`Lease(run_url).acquire()` creates the file with a conditional write (S3: PUT If-None-Match: *;
local: O_EXCL), so of two sidecars started at once exactly one wins; the other gets `LeaseHeld`,
one sentence naming the holder. A heartbeat thread renews it every `seconds / 3` with a
conditional overwrite (S3: If-Match the ETag it last wrote). A lease whose `expires_at` has passed
(its sidecar was killed or lost the storage) is taken over by the next sidecar, which resumes from
analysis/state.json; so is, at once, a lease whose holder ran on this host under a process id
that is no longer alive (a sidecar killed here and restarted here need not wait out the lease).
A holder that finds its lease taken over stops acting (`check()` raises `LeaseLost`) instead of
submitting jobs beside the new holder.

Expiry compares wall clocks of different machines: keep them in sync (NTP) and `seconds` well
above their skew."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from linearsr.core import storage
from linearsr.core.util import pid_alive

log = logging.getLogger(__name__)


class LeaseHeld(ValueError):
    """Another live sidecar holds the run (a user-facing one-sentence error)."""


class LeaseLost(ValueError):
    """This sidecar's lease was taken over: it must stop acting on the run (one sentence)."""


def _dead_here(record: dict) -> bool:
    """True when the lease's holder ran on this host and its process is gone."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    return not pid_alive(pid)


class Lease:
    def __init__(self, run_url: str, seconds: float = 120.0, clock=time.time):
        if seconds <= 0:
            raise ValueError(f"esgf.lease_seconds must be > 0, got {seconds}")
        self.url = storage.join(run_url, "analysis", "lease.json")
        self.seconds, self.clock = seconds, clock
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = self.clock()

    def _record(self) -> bytes:
        now = self.clock()
        return storage.dumps({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                              "started_at": self.started_at, "heartbeat_at": now,
                              "expires_at": now + self.seconds}, indent=1).encode()

    def acquire(self) -> "Lease":
        """Take the lease (or an expired one over); LeaseHeld when a live sidecar has it."""
        while True:
            self.tag = storage.create_exclusive(self.url, self._record())
            if self.tag is not None:
                return self
            current = storage.read_with_tag(self.url)
            if current is None:  # released between our two calls: try again
                continue
            data, tag = current
            other = storage.loads(data.decode())
            if other.get("expires_at", 0) > self.clock() and not _dead_here(other):
                raise LeaseHeld(
                    f"{self.url} is held by another sidecar ({other.get('holder')}, heartbeat "
                    f"{self.clock() - other.get('heartbeat_at', 0):.0f} s ago): stop it first, or wait until its "
                    f"lease expires in {other['expires_at'] - self.clock():.0f} s (esgf.lease_seconds)")
            self.tag = storage.replace_if_unchanged(self.url, self._record(), tag)
            if self.tag is not None:
                log.warning("took over the sidecar lease of %s (%s; its last heartbeat was %.0f s ago); "
                            "resuming from analysis/state.json", other.get("holder"),
                            "expired" if other.get("expires_at", 0) <= self.clock() else "its process is gone",
                            self.clock() - other.get("heartbeat_at", 0))
                return self

    def renew(self) -> None:
        """Extend the lease; LeaseLost when another sidecar took it over in the meantime."""
        self.check()
        tag = storage.replace_if_unchanged(self.url, self._record(), self.tag)
        if tag is None:
            self.lost = True
            self.check()
        self.tag = tag

    def check(self) -> None:
        """Raise LeaseLost if the lease was found taken over (call before acting on the run)."""
        if self.lost:
            raise LeaseLost(f"{self.url} was taken over by another sidecar; this one stops")

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except OSError as e:  # storage trouble: the lease may expire; the next beat tries again
                log.warning("could not renew the sidecar lease %s: %s", self.url, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        current = storage.read_with_tag(self.url)
        if not self.lost and current is not None and current[1] == self.tag:
            storage.rm(self.url)

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="sidecar-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
