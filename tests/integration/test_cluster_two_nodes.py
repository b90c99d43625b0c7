"""A simulated multi-node cluster: `ray.cluster_utils.Cluster` starts a head and two worker nodes
on this machine (1 CPU each, so the 2 DeepSpeed ZeRO-2 workers land on two different nodes and
one node is spare), the shards and the run dir live on the local S3 server (no folder is shared
through the run), and mid-run a worker-hosting node other than the head is killed outright;
later rank 0 dies while it saves a checkpoint. Ray Train restarts
the workers both times, they resume from the last COMPLETE checkpoint on S3, and the run ends at
its step budget with every step once in metrics.jsonl and at most one checkpoint interval lost
per failure."""

from __future__ import annotations

import os
import threading
import time

import pytest

from linearsr.core import storage
from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer import rundir

pytestmark = pytest.mark.integration

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cpu_tiny.toml")
EVERY = 10  # validation and checkpoint interval


@pytest.fixture
def two_nodes(monkeypatch):
    import tempfile

    from ray.cluster_utils import Cluster

    from linearsr.dev.local_ray import free_port

    base = tempfile.mkdtemp(prefix="r2n-", dir="/tmp")  # short (socket paths) and private to this cluster
    monkeypatch.setenv("RAY_TMPDIR", base)  # where Ray notes "the current cluster"
    temp = os.path.join(base, "ray")
    os.makedirs(temp)
    # the address is fixed before the nodes start, so every process on them (Ray Train's helpers
    # look the cluster up by themselves) finds this cluster even when the test session runs another
    from ray._private.services import get_node_ip_address

    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"{get_node_ip_address()}:{port}")
    node = {"num_cpus": 1, "temp_dir": temp}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "gcs_server_port": port})
    workers = [cluster.add_node(**node) for _ in range(2)]  # the spare one takes over from a killed one
    try:
        yield cluster, workers
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def test_a_killed_node_and_a_crash_while_saving_cost_at_most_one_interval_each(two_nodes, s3_bucket, tiny_shards, tmp_path):
    from linearsr.cluster.launch import train
    from linearsr.trainer.config import load_config

    cluster, workers = two_nodes
    shards, run = f"{s3_bucket}/shards", f"{s3_bucket}/runs/two-nodes"
    storage.upload_dir(tiny_shards, shards)
    marker = str(tmp_path / "rank0-died")
    cfg = load_config(CONFIG, [
        f"data.shards={shards}", "data.crop=32", "data.val_crop=32", "data.batch_size=2", "data.num_workers=0",
        "data.shuffle_buffer=4", "data.crops_per_image=1", f"validation.every={EVERY}", f"checkpoint.every={EVERY}",
        "validation.max_batches=1", "validation.image_every=0", "flow.val_points_per_interval=1",
        "run.steps=40", "run.log_every=5", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
        "cluster.max_failures=3", f"cluster.address={cluster.address}", "tags.source=photo",
        "faults.die_at_step=30", "faults.die_rank=0", "faults.die_during_checkpoint=true",
        f"faults.die_once_marker={marker}",
    ]).replace(run={"url": run})

    killed: dict = {}

    def kill_a_training_node_after_step_20():
        from ray.util.state import list_actors

        while not killed:
            steps = [r["step"] for r in rundir.read_metrics(run)]
            if steps and max(steps) >= 20:
                busy = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                                 ("state", "=", "ALIVE")])}
                victim = next(w for w in workers if w.node_id in busy)
                cluster.remove_node(victim, allow_graceful=False)
                killed["after_step"] = max(steps)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=kill_a_training_node_after_step_20, daemon=True)
    watcher.start()
    result = train(cfg)
    killed.setdefault("after_step", None)
    watcher.join(timeout=60)

    assert killed["after_step"] is not None and os.path.exists(marker), (killed, "both failures must have happened")
    records = rundir.read_metrics(run)
    assert [r["step"] for r in records] == [10, 20, 30, 40] and result.step == 40
    # each failure restarted from the newest complete checkpoint at most one interval back
    assert [r["start_step"] for r in records] == [0, 0, 20, 20]
    assert records[-1]["val_loss"] < records[0]["val_loss"]  # the curve went on from where it was
    found = ckpt.list_checkpoints(run)
    assert [(f.step, f.complete) for f in found] == [(10, True), (20, True), (30, True), (40, True)]
    marker30 = ckpt.read_marker(ckpt.url_of(run, 30))
    assert all(info["sha256"] for info in marker30["files"].values())
    assert {f"state_rank{r}.json" for r in (0, 1)} <= set(marker30["files"])  # both nodes' files, on S3
