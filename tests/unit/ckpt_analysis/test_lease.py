"""One sidecar per run: the lease in RUN/analysis/lease.json (local run dirs; S3: tests/integration)."""

import pytest

from linearsr.ckpt_analysis.lease import Lease, LeaseHeld, LeaseLost
from linearsr.core import storage


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_second_sidecar_is_refused_naming_the_holder(tmp_path):
    run = str(tmp_path / "run")
    first = Lease(run, seconds=60).acquire()
    with pytest.raises(LeaseHeld, match=rf"held by another sidecar \({first.holder}, heartbeat 0 s ago\): stop it first"):
        Lease(run, seconds=60).acquire()
    first.release()
    assert not storage.exists(first.url)
    Lease(run, seconds=60).acquire()  # released: the next one gets it


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops(tmp_path):
    run, clock = str(tmp_path / "run"), Clock()
    old = Lease(run, seconds=60, clock=clock).acquire()
    clock.now += 30
    old.renew()  # a heartbeat: expires 60 s from now
    clock.now += 59
    with pytest.raises(LeaseHeld):
        Lease(run, seconds=60, clock=clock).acquire()
    clock.now += 2  # no heartbeat for 61 s: the old sidecar is presumed dead
    new = Lease(run, seconds=60, clock=clock).acquire()
    assert storage.read_json(new.url)["holder"] == new.holder
    with pytest.raises(LeaseLost, match="taken over by another sidecar"):
        old.renew()
    with pytest.raises(LeaseLost):
        old.check()
    old.release()  # not ours any more: left alone
    assert storage.read_json(new.url)["holder"] == new.holder
    new.renew()


def test_the_heartbeat_keeps_a_live_sidecar_s_lease(tmp_path):
    run = str(tmp_path / "run")
    with Lease(run, seconds=0.3) as lease:
        import time

        time.sleep(1.0)  # three lease lengths: only the heartbeat keeps it
        with pytest.raises(LeaseHeld):
            Lease(run, seconds=0.3).acquire()
        lease.check()
    assert not storage.exists(lease.url)


def test_a_lease_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    run = str(tmp_path / "run")
    code = f"from linearsr.ckpt_analysis.lease import Lease; Lease({run!r}, seconds=3600).acquire()"
    subprocess.run([sys.executable, "-c", code], check=True)  # acquires, then exits without releasing
    dead = storage.read_json(Lease(run).url)
    new = Lease(run, seconds=3600).acquire()  # no hour-long wait: its holder's pid is gone
    assert storage.read_json(new.url)["holder"] == new.holder != dead["holder"]
    live = Lease(str(tmp_path / "other"), seconds=3600).acquire()
    with pytest.raises(LeaseHeld):  # our own process is alive: refused as before
        Lease(str(tmp_path / "other"), seconds=3600).acquire()
    live.release()
