"""Faults injected into real `linearsr train` runs on the session's local Ray head (two Ray jobs
at once, submitted with `linearsr submit`), both with their run dir on the local S3 server and
recognisable fake credentials in their environment:

storage:  every S3 request goes through a fault proxy (resets, 503 SlowDown, cut bodies) and the
          step-20 checkpoint's prefix is down long enough that its upload fails after all retries.
diverge:  NaN loss from step 35 on (`faults.nan_at_step`), watched by the ESGF sidecar
          (`linearsr analyze --watch --pretrain-job`), which must stop it. The experts that would
          follow are replaced by a recorder here (they are exercised in test_sidecar_e2e.py and
          test_sidecar_jobs.py).
Then every output of both runs is searched for the credentials."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from linearsr.ckpt_analysis.sidecar import Sidecar
from linearsr.cluster.jobs import Jobs
from linearsr.core import storage
from linearsr.main import main
from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer import rundir
from tests.support.faultproxy import FaultProxy

pytestmark = pytest.mark.integration

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cpu_tiny.toml")
TINY = [  # cpu_tiny on 32 px crops, one DeepSpeed worker of half a CPU (as test_sidecar_e2e.py)
    "data.batch_size=4", "data.crop=32", "data.val_crop=32", "data.shuffle_buffer=8",
    "validation.every=10", "validation.max_batches=1", "validation.sample_steps=2", "validation.image_every=0",
    "flow.val_points_per_interval=2", "optim.lr=2e-3", "optim.warmup_steps=5", "run.log_every=10",
    "cluster.num_workers=1", "cluster.cpus_per_worker=0.5", "checkpoint.every=10", "cluster.max_failures=2",
    "tags.source=photo",  # the shards' own tags: these tests are about training, not the tagger
]
FAKE_KEY_ID = "AKIAFAKESECRET0123456"
FAKE_SECRET = "fakeSecretValue/xyz+Q9w8e7r6t5y4u3i2o1p0LkJh"
NAN_FROM = 35
OUTAGE_S = 60  # seconds of 503 SlowDown + dropped connections on one checkpoint's prefix


def _submit(address: str, sid: str, endpoint: str, run: str, *overrides: str) -> None:
    """`linearsr submit`, forwarding the credentials by name (--env) and the endpoint (always)."""
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    assert main(["submit", "--address", address, "--submission-id", sid, "--config", CONFIG, *TINY, *overrides,
                 "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY", "--run", run]) == 0


@pytest.fixture(scope="module")
def runs(ray_cluster, s3_server, tiny_shards):
    bucket = s3_server.make_bucket(f"reliab-{uuid.uuid4().hex[:8]}")
    fs, _ = storage.filesystem(bucket)
    fs.put(tiny_shards, f"{bucket[5:]}/shards", recursive=True)
    out = {"bucket": bucket, "storage": f"{bucket}/runs/storage", "diverge": f"{bucket}/runs/diverge",
           "sid_storage": f"reliab-storage-{uuid.uuid4().hex[:6]}", "sid_diverge": f"reliab-diverge-{uuid.uuid4().hex[:6]}"}
    shards = f"data.shards={bucket}/shards"
    jobs = Jobs(ray_cluster)
    stdout, stderr, logs = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    root = logging.getLogger()
    mp = pytest.MonkeyPatch()
    faults = FaultProxy(s3_server.endpoint, reset=0.02, slowdown=0.04, truncate=0.04, seed=3)
    clean = FaultProxy(s3_server.endpoint)  # forwards untouched; records which credentials were used
    with faults, clean, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
            mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
            mp.setenv("AWS_ENDPOINT_URL", clean.url)
            mp.setattr(storage, "_filesystems", {})  # clients of this process resolve the credentials again
            root.addHandler(handler)
            mp.setattr(root, "level", logging.INFO)
            # the step-20 checkpoint's prefix answers 503 SlowDown or drops the connection for a minute
            faults.fail_for("PUT", "/runs/storage/checkpoints/checkpoint_000020/", OUTAGE_S)
            _submit(ray_cluster, out["sid_storage"], faults.url, out["storage"], shards, "run.steps=30",
                    "data.num_workers=1")
            _submit(ray_cluster, out["sid_diverge"], clean.url, out["diverge"], shards, "data.num_workers=0",
                    "run.steps=1000", f"faults.nan_at_step={NAN_FROM}", "esgf.poll_seconds=1")
            os.environ["AWS_ENDPOINT_URL"] = clean.url
            decided = []
            mp.setattr(Sidecar, "run_experts", lambda self, d, retry_failed=False: decided.append(d) or 0)
            out["sidecar_rc"] = main(["analyze", out["diverge"], "--watch", "--pretrain-job", out["sid_diverge"],
                                      "--ray-address", ray_cluster, "--poll", "1"])
            out["handed_to_experts"] = decided
            out["info_diverge"] = jobs.wait(out["sid_diverge"], timeout=300)
            out["info_storage"] = jobs.wait(out["sid_storage"], timeout=600)
            # a one-shot analyze with debug logging, as its own process
            env = {**os.environ, "AWS_ENDPOINT_URL": clean.url}
            proc = subprocess.run([sys.executable, "-m", "linearsr", "analyze", out["diverge"], "-v"], env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            out["analyze_output"] = proc.stdout + proc.stderr
        finally:
            root.removeHandler(handler)
            mp.undo()
    out["faults"], out["clean"] = faults, clean
    out["log_storage"] = jobs.logs_tail(out["sid_storage"], 10**6)
    out["log_diverge"] = jobs.logs_tail(out["sid_diverge"], 10**6)
    out["printed"] = stdout.getvalue() + stderr.getvalue() + logs.getvalue()
    return out


def test_a_minute_of_storage_outage_during_a_save_is_ridden_out_with_every_retry_counted(runs):
    log = runs["log_storage"]
    assert runs["info_storage"].status == "SUCCEEDED", log[-5000:]
    counts = runs["faults"].counts
    assert counts["targeted_slowdown"] >= 3 and counts["targeted_reset"] >= 3, counts  # the outage happened

    records = rundir.read_metrics(runs["storage"])
    assert [r["step"] for r in records] == [10, 20, 30]  # the step budget; no step twice, none missing
    assert [r["start_step"] for r in records] == [0, 0, 0]  # no worker restart: the save waited the outage out
    assert all(r["data_skips"] == {} for r in records)  # no sample lost to a storage fault
    # every 503 reached a retry loop (botocore's or ours) and was counted; the metrics carry them
    assert records[-1]["storage_retries"] >= counts["targeted_slowdown"], (records[-1], counts)
    assert "checkpoint_000020" in log and "retry" in log  # the retries of the save, named in the log

    # every checkpoint is complete, and complete means every file its COMPLETE marker lists is there
    found = ckpt.list_checkpoints(runs["storage"])
    assert [(f.step, f.complete) for f in found] == [(10, True), (20, True), (30, True)]
    fs, _ = storage.filesystem(runs["storage"])
    for f in found:
        prefix = f.url[len("s3://"):]
        present = {p[len(prefix) + 1:] for p in fs.find(prefix)} - {ckpt.MARKER}
        listed = set(storage.read_json(storage.join(f.url, ckpt.MARKER))["files"])
        assert listed == present and ckpt.META in listed and any(p.startswith(f"{ckpt.TAG}/") for p in listed)
        assert ckpt.read_meta(f.url)["step"] == f.step
    assert [r["checkpoint"] for r in records] == [f.url for f in found]


def test_divergence_is_recorded_detected_and_stops_the_pretrain_before_any_later_checkpoint(runs, tmp_path):
    assert runs["sidecar_rc"] == 0, runs["log_diverge"][-3000:]
    assert runs["info_diverge"].status == "STOPPED"  # stopped by the sidecar, far from its 1000-step budget
    records = rundir.read_metrics(runs["diverge"])
    first_nan = next(r["step"] for r in records if math.isnan(r["train_loss"]))
    assert first_nan == 40  # the first validation after step 35
    for r in records:  # the trainer records it: NaN train loss, DeepSpeed skipping every step from 35 on
        nan = r["step"] >= first_nan
        assert math.isnan(r["train_loss"]) == nan and r["skipped_steps"] == (r["step"] - NAN_FROM + 1 if nan else 0)
        assert math.isfinite(r["val_loss"])  # skipped steps leave the weights (and the val loss) finite

    d = storage.read_json(storage.join(runs["diverge"], "analysis", "decision.json"))
    assert d["diverged_at"] == first_nan and d["divergence"]["kind"] == "nonfinite"
    assert d["divergence"]["detail"] == f"train loss is nan at step {first_nan}"
    assert d["method"] == "best_before_divergence" and d["checkpoint_step"] in (10, 20, 30)
    assert d["checkpoint"] == ckpt.url_of(runs["diverge"], d["checkpoint_step"]) and ckpt.is_complete(d["checkpoint"])
    assert f"checkpoints from step {first_nan} on are excluded" in d["reason"]
    assert runs["handed_to_experts"] == [d]  # the experts would start from that checkpoint

    state = storage.read_json(storage.join(runs["diverge"], "analysis", "state.json"))
    assert state["pretrain_stopped"]["job"] == runs["sid_diverge"]
    assert state["pretrain_stopped"]["reason"].startswith(f"divergence began at step {first_nan}: train loss is nan")
    assert any(e["event"].startswith(f"stopped the pretrain job {runs['sid_diverge']}") for e in state["events"])

    # TensorBoard: the marker at the divergence step beside the NaN train loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fs, path = storage.filesystem(storage.join(runs["diverge"], "tb"))
    for f in fs.ls(path):
        fs.get_file(f, str(tmp_path / os.path.basename(f)))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("esgf/diverged")] == [(first_nan, 1.0)]
    assert any(math.isnan(e.value) for e in acc.Scalars("loss/train_loss"))


def test_credentials_never_appear_in_any_output(runs, ray_cluster, tmp_path_factory):
    # the fake credentials were really in use: every request the proxies saw was signed with them
    assert runs["faults"].access_key_ids == runs["clean"].access_key_ids == {FAKE_KEY_ID}
    needles = [FAKE_KEY_ID.encode(), FAKE_SECRET.encode(), FAKE_SECRET.split("/")[1].encode()]
    outputs: dict[str, bytes] = {
        "linearsr submit/analyze --watch (stdout, stderr, log)": runs["printed"].encode(),
        "linearsr analyze -v": runs["analyze_output"].encode(),
        "Ray job log (storage faults)": runs["log_storage"].encode(),
        "Ray job log (divergence)": runs["log_diverge"].encode(),
    }
    printed = runs["printed"]
    assert "forwarded environment: AWS_ACCESS_KEY_ID=***" in printed  # submit names what it forwards, never the value
    # ... and warns that Ray itself records and logs a forwarded job environment (see below)
    assert "linearsr submit: warning: --env AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: Ray keeps a job's environment" in printed
    fs, _ = storage.filesystem(runs["bucket"])
    files = fs.find(runs["bucket"][5:] + "/runs")
    for name in ("config.json", "metrics.jsonl", "meta.json", "COMPLETE", "tfevents", "state.json",
                 "decision.json", "curve.png"):
        assert any(name in f for f in files), f"no {name} among the run outputs"
    for f in files:  # every file of both runs, raw bytes: checkpoints, TensorBoard events, analysis
        outputs[f"s3://{f}"] = fs.cat_file(f)
    # the Ray head's own logs (drivers, workers, dashboard, raylet, GCS): clean too, except the runtime
    # env agent's, which logs every runtime env it creates, the env_vars that --env forwarded among them
    logs = _ray_session_logs(tmp_path_factory, ray_cluster)
    assert any(p.name.startswith("job-driver-reliab-diverge") for p in logs), [p.name for p in logs]
    for p in logs:
        if not p.name.startswith("runtime_env_agent"):
            outputs[str(p)] = p.read_bytes()
    leaks = [where for where, data in outputs.items() if any(n in data for n in needles)]
    assert not leaks, f"credentials found in: {leaks}"


def _ray_session_logs(tmp_path_factory, address: str) -> list:
    """Every log file of the session's local Ray head (the `ray_cluster` fixture's temp dir)."""
    from linearsr.dev import local_ray as local

    for state in tmp_path_factory.getbasetemp().glob("ray*"):
        cluster = local.attach(str(state))
        if cluster is not None and cluster.jobs_address == address:
            return sorted(p for p in Path(cluster.temp_dir).glob("session_*/logs/**/*") if p.is_file())
    raise AssertionError(f"no local Ray head with the Jobs API {address} under {tmp_path_factory.getbasetemp()}")
