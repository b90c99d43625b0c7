"""The sidecar against a cluster that forgets jobs (a restarted Ray head) and against a second
sidecar on the same run, with a stand-in for the Jobs API."""

import pytest

from linearsr.ckpt_analysis.config import ESGFConfig
from linearsr.ckpt_analysis.experts import JobSpec, JobTracker
from linearsr.ckpt_analysis.lease import Lease, LeaseHeld, LeaseLost
from linearsr.ckpt_analysis.sidecar import Sidecar
from linearsr.ckpt_analysis.state import State
from linearsr.cluster.jobs import JobInfo
from linearsr.model.flow import Interval
from linearsr.trainer.rundir import RunDir
from tests.unit.ckpt_analysis.test_sidecar import make_run


class ForgetfulJobs:
    """Jobs API stand-in: `forget` holds submission ids the cluster has no record of."""

    def __init__(self, statuses=None):
        self.statuses = dict(statuses or {})
        self.forget: set[str] = set()
        self.submitted: list[str] = []

    def info(self, sid):
        if sid in self.forget or sid not in self.statuses:
            return None
        return JobInfo(sid, self.statuses[sid], "python -m linearsr train ...")

    def submit(self, sid, entrypoint, **kw):
        self.submitted.append(sid)
        self.statuses.setdefault(sid, "RUNNING")
        return self.info(sid)

    def logs_tail(self, sid, lines=20):
        return ""

    def stop(self, sid):
        self.statuses[sid] = "STOPPED"
        return True


def test_a_pretrain_job_the_cluster_forgot_is_unknown_not_finished(tmp_path):
    run = make_run(tmp_path / "run", 12, noise=0.0)  # still falling: only "finished" would decide now
    sidecar = Sidecar(run, pretrain_job="pre-1", jobs=ForgetfulJobs(), sleep=lambda s: None)
    assert sidecar.run_finished(sidecar.run.read_metrics()) is False
    assert sidecar.analyze().decision is None
    events = [e["event"] for e in State(sidecar.run).data["events"]]
    assert any("no record of the pretrain job pre-1" in e and "no decision on a partial curve" in e for e in events)


def test_an_expert_job_the_cluster_lost_is_resubmitted_without_spending_a_retry(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    jobs = ForgetfulJobs()
    state = State(run)
    tracker = JobTracker(jobs, state, run, ESGFConfig(), sleep=lambda s: None, token="abc")
    spec = JobSpec("L1-0", "expert L1-0", Interval(-1.0, 1.0), str(tmp_path / "run" / "experts" / "L1-0"), "CKPT")
    polls = []

    def cluster(): # the head restarts once while the first attempt runs, then the second one finishes
        polls.append(1)
        first = jobs.submitted[0]
        if len(polls) == 1:
            jobs.forget.add(first)
        elif len(jobs.submitted) == 2:
            jobs.statuses[jobs.submitted[1]] = "SUCCEEDED"

    assert tracker.run([spec], poll_seconds=0, on_poll=cluster) == {"L1-0": "succeeded"}
    rec = state.jobs["L1-0"]
    assert [a["status"] for a in rec["attempts"]] == ["LOST", "SUCCEEDED"]
    assert rec["budget"] == 1 + ESGFConfig().experts.max_retries + 1  # the lost attempt was given back
    assert any("resubmitting it, not counted against its retries" in e["event"] for e in state.data["events"])


def test_a_second_sidecar_on_the_run_is_refused_and_one_that_lost_its_lease_stops_submitting(tmp_path, capsys):
    from linearsr.main import main

    run = make_run(tmp_path / "run", 12, noise=0.0)
    holder = Lease(run, seconds=60).acquire()
    assert main(["analyze", run, "--watch", "--ray-address", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"held by another sidecar ({holder.holder}" in err and "\n" not in err

    sidecar = Sidecar(run, jobs=ForgetfulJobs(), sleep=lambda s: None)
    sidecar.lease = holder  # as inside watch(); then another sidecar takes the run over
    holder.lost = True
    tracker = JobTracker(sidecar.jobs, sidecar.state, sidecar.run, sidecar.cfg, token="t", guard=sidecar._guard)
    spec = JobSpec("L1-0", "expert L1-0", Interval(-1.0, 1.0), f"{run}/experts/L1-0", "CKPT")
    with pytest.raises(LeaseLost):
        tracker.run([spec], poll_seconds=0)
    assert sidecar.jobs.submitted == []  # nothing submitted beside the new holder
    with pytest.raises(LeaseHeld):  # the file is still the old holder's: a third one waits for expiry
        Lease(run, seconds=60).acquire()
