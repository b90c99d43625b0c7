"""ESGF end to end on the local Ray cluster, with the real trainer:

tiny pretrain (a Ray job: `linearsr train`, 1 DeepSpeed worker, EMA weights) watched by the
sidecar -> decision once the run has finished -> the expert tree: 2 halves from the decision's
checkpoint, then 4 leaves from their parent's best, each level's jobs at the same time (`linearsr
train --init --t-interval=`) -> each leaf's best checkpoint exported (EMA weights) -> bundle ->
`linearsr upscale --bundle` routes an 8-step sample through all 4 experts, each step to the expert
owning its log-SNR. About 3 minutes on 2 cores (7 DeepSpeed fits)."""

import os
import uuid

import pytest
from PIL import Image

from linearsr.cluster.jobs import Jobs, command
from linearsr.core.storage import read_json
from linearsr.main import main
from linearsr.model import inference as upscale_mod
from linearsr.model.bundle import read_manifest
from linearsr.model.flow import find_interval
from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer.config import load_config
from linearsr.trainer.rundir import read_metrics

pytestmark = pytest.mark.integration

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cpu_tiny.toml")
PRETRAIN = [  # cpu_tiny on 32 px crops, one worker: ~0.1 s a step
    "data.batch_size=4", "data.crop=32", "data.val_crop=32", "data.num_workers=0", "data.shuffle_buffer=8",
    "validation.every=10", "validation.max_batches=1", "validation.sample_steps=2", "validation.image_every=0",
    "flow.val_points_per_interval=2", "optim.lr=2e-3", "optim.warmup_steps=5", "run.log_every=10",
    "cluster.num_workers=1", "cluster.cpus_per_worker=0.5", "checkpoint.every=10", "run.steps=60",
    "esgf.poll_seconds=1", "esgf.knee.min_validations=5", "esgf.stop_at_knee=false",
    "esgf.experts.steps=5", "esgf.experts.num_cpus=0.5",
    "tags.source=photo",  # the shards' own tags: these tests are about training, not the tagger
    'esgf.experts.overrides=["validation.every=5", "checkpoint.every=5"]',
]


def test_pretrain_knee_tree_of_experts_bundle_upscale(ray_cluster, tiny_shards, tmp_path, monkeypatch):
    run = str(tmp_path / f"e2e-{uuid.uuid4().hex[:6]}")
    jobs = Jobs(ray_cluster)
    pretrain = f"e2e-pretrain-{uuid.uuid4().hex[:6]}"
    jobs.submit(pretrain, command("train", "--config", os.path.abspath(CONFIG), *PRETRAIN,
                                  f"data.shards={tiny_shards}", "--run", run), num_cpus=0.5)
    # the sidecar starts beside the pretrain (before its run dir exists) and follows it
    rc = main(["analyze", run, "--watch", "--pretrain-job", pretrain, "--ray-address", ray_cluster, "--poll", "1"])
    assert rc == 0, jobs.logs_tail(pretrain, 40)

    # the decision: on a complete checkpoint of the run, read on the EMA weights' loss
    assert jobs.info(pretrain).status == "SUCCEEDED"
    d = read_json(os.path.join(run, "analysis", "decision.json"))
    assert d["method"] in ("knee", "best") and d["diverged_at"] is None and d["curve"]["weights"] == "ema"
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(10, 61, 10))
    assert all(r["weights"] == "ema" and "val_loss_raw" in r for r in records)
    assert ckpt.is_complete(d["checkpoint"]) and d["checkpoint"] == ckpt.url_of(run, d["checkpoint_step"])

    # the tree: each level's jobs concurrently; level 1 from the decision, each leaf from its parent's best
    state = read_json(os.path.join(run, "analysis", "state.json"))
    tree = load_config(CONFIG).flow.tree()
    keys = [n.interval.key for n in tree[2]]
    for level in tree[1:]:
        attempts = [state["jobs"][n.id]["attempts"] for n in level]
        assert all(len(a) == 1 and a[0]["status"] == "SUCCEEDED" for a in attempts), attempts
        windows = [(a[0]["start_time"], a[0]["end_time"]) for a in attempts]
        assert max(s for s, _ in windows) < min(e for _, e in windows), f"level jobs did not overlap: {windows}"
    nodes = state["tree"]["nodes"]
    for level in tree[1:]:
        for n in level:
            cfg = read_json(os.path.join(state["jobs"][n.id]["run"], "config.json"))
            init = d["checkpoint"] if n.level == 1 else nodes[n.parent_id]["best"]["checkpoint"]
            assert cfg["finetune"] == {"init": init, "t_interval": n.interval.key}
            own = read_metrics(state["jobs"][n.id]["run"])
            assert list(own[-1]["val_loss_by_interval"]) == [n.interval.key]
            # TensorBoard's step axis continues the run it started from: its global step + its own
            start = ckpt.read_meta(init)["global_step"]
            assert [r["global_step"] for r in own] == [start + r["step"] for r in own]
            assert ckpt.read_meta(ckpt.url_of(state["jobs"][n.id]["run"], 5))["init_weights"] == "ema"

    # the bundle: one exported leaf per interval (EMA weights), the tree and the training shift recorded
    manifest = read_manifest(os.path.join(run, "bundle"))
    assert [e["interval"] for e in manifest["experts"]] == [k.split(",") for k in keys]
    assert [e["node"] for e in manifest["experts"]] == [n.id for n in tree[2]]
    for e in manifest["experts"]:
        meta = read_json(os.path.join(run, "bundle", e["weights"].replace(".safetensors", ".json")))
        assert meta["weights"] == "ema" and meta["checkpoint"] == nodes[e["node"]]["best"]["checkpoint"]
    assert manifest["knee_step"] == d["knee_step"] and manifest["sampling"] == {"shift": 3.0}
    assert len(manifest["tree"]["nodes"]) == 6

    # upscale with the bundle: an 8-step sample visits every expert, each step the one owning its lambda
    Image.new("RGB", (12, 10), (120, 80, 40)).save(tmp_path / "lr.png")
    loaded = []
    real_load = upscale_mod.load_bundle
    monkeypatch.setattr(upscale_mod, "load_bundle", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    assert main(["upscale", "--bundle", os.path.join(run, "bundle"), str(tmp_path / "lr.png"),
                 "--out", str(tmp_path / "out"), "--steps", "8", "--tile", "0", "--tags", "red"]) == 0
    assert Image.open(tmp_path / "out" / "lr.png").size == (48, 40)
    moe = loaded[0]
    route = moe.route
    assert len(route) == 8 and moe.shift == 3.0 and route[1][0] > 1 - 1 / 8  # the grid follows the training shift
    assert [i for _, _, i in route] == [find_interval(moe.intervals, lam) for _, lam, _ in route]
    assert {i for _, _, i in route} == {0, 1, 2, 3}
