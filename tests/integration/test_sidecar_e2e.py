"""ESGF end to end on the local Ray cluster, with the real trainer:

tiny pretrain (a Ray job: `linearsr train`, 1 DeepSpeed worker) watched by the sidecar
-> decision once the run has finished -> 4 expert fine-tune jobs (`linearsr train --init
--t-interval=`) running at the same time -> each expert's best checkpoint exported -> bundle
-> `linearsr upscale --bundle` routes an 8-step sample through all 4 experts, each step to the
expert owning its log-SNR. About 2-3 minutes on 2 cores (5 DeepSpeed fits)."""

import os
import uuid

import pytest
from PIL import Image

from linearsr.cluster.jobs import Jobs, command
from linearsr.main import main
from linearsr.model import upscale as upscale_mod
from linearsr.model.bundle import read_manifest
from linearsr.model.flow import find_interval
from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer.rundir import RunDir, read_json, read_metrics

pytestmark = pytest.mark.integration

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cpu_tiny.toml")
PRETRAIN = [  # cpu_tiny on 32 px crops, one worker: ~0.1 s a step
    "data.batch_size=4", "data.crop=32", "data.val_crop=32", "data.num_workers=0", "data.shuffle_buffer=8",
    "validation.every=10", "validation.max_batches=1", "validation.sample_steps=2", "validation.image_every=0",
    "flow.val_points_per_interval=2", "optim.lr=2e-3", "optim.warmup_steps=5", "run.log_every=10",
    "cluster.num_workers=1", "cluster.cpus_per_worker=0.5", "checkpoint.every=10", "run.steps=60",
    "esgf.poll_seconds=1", "esgf.knee.min_validations=5",
    "esgf.experts.steps=5", "esgf.experts.num_cpus=0.5",
    "tags.source=photo",  # the shards' own tags: these tests are about training, not the tagger
    'esgf.experts.overrides=["validation.every=5", "checkpoint.every=5"]',
]


def test_pretrain_knee_parallel_experts_bundle_upscale(ray_cluster, tiny_shards, tmp_path, monkeypatch):
    run = str(tmp_path / f"e2e-{uuid.uuid4().hex[:6]}")
    jobs = Jobs(ray_cluster)
    pretrain = f"e2e-pretrain-{uuid.uuid4().hex[:6]}"
    jobs.submit(pretrain, command("train", "--config", os.path.abspath(CONFIG), *PRETRAIN,
                                  f"data.shards={tiny_shards}", "--run", run), num_cpus=0.5)
    # the sidecar starts beside the pretrain (before its run dir exists) and follows it
    rc = main(["analyze", run, "--watch", "--pretrain-job", pretrain, "--ray-address", ray_cluster, "--poll", "1"])
    assert rc == 0, jobs.logs_tail(pretrain, 40)

    # the decision: taken once the pretrain had finished, on a complete checkpoint of the run
    assert jobs.info(pretrain).status == "SUCCEEDED"
    d = read_json(os.path.join(run, "analysis", "decision.json"))
    assert d["method"] in ("kneedle", "best") and d["diverged_at"] is None
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(10, 61, 10))
    assert ckpt.is_complete(d["checkpoint"]) and d["checkpoint"] == ckpt.url_of(run, d["checkpoint_step"])

    # four expert jobs, each from the decision's checkpoint on its own interval, running concurrently
    state = read_json(os.path.join(run, "analysis", "state.json"))
    keys = ["-inf,-3", "-3,0", "0,3", "3,inf"]
    attempts = [state["jobs"][f"expert-{i}"]["attempts"] for i in range(4)]
    assert all(len(a) == 1 and a[0]["status"] == "SUCCEEDED" for a in attempts), attempts
    windows = [(a[0]["start_time"], a[0]["end_time"]) for a in attempts]
    assert max(s for s, _ in windows) < min(e for _, e in windows), f"expert jobs did not overlap: {windows}"
    for i, key in enumerate(keys):
        expert = RunDir(run).expert(i, key)
        cfg = read_json(expert.config)
        assert cfg["finetune"] == {"init": d["checkpoint"], "t_interval": key}
        assert list(read_metrics(expert.url)[-1]["val_loss_by_interval"]) == [key]

    # the bundle: one exported expert per interval, each from its own fine-tune
    manifest = read_manifest(os.path.join(run, "bundle"))
    assert [e["interval"] for e in manifest["experts"]] == [k.split(",") for k in keys]
    for i, (e, key) in enumerate(zip(manifest["experts"], keys)):
        meta = read_json(os.path.join(run, "bundle", e["weights"].replace(".safetensors", ".json")))
        assert meta["interval"] == key and meta["checkpoint"].startswith(RunDir(run).expert(i, key).url)
    assert manifest["knee_step"] == d["knee_step"]

    # upscale with the bundle: an 8-step sample visits every expert, each step the one owning its lambda
    Image.new("RGB", (12, 10), (120, 80, 40)).save(tmp_path / "lr.png")
    loaded = []
    real_load = upscale_mod.load_bundle
    monkeypatch.setattr(upscale_mod, "load_bundle", lambda p: loaded.append(real_load(p)) or loaded[-1])
    assert main(["upscale", "--bundle", os.path.join(run, "bundle"), str(tmp_path / "lr.png"),
                 "--out", str(tmp_path / "out"), "--steps", "8", "--tile", "0", "--tags", "red"]) == 0
    assert Image.open(tmp_path / "out" / "lr.png").size == (48, 40)
    moe = loaded[0]
    route = moe.route
    assert len(route) == 8
    assert [i for _, _, i in route] == [find_interval(moe.intervals, lam) for _, lam, _ in route]
    assert {i for _, _, i in route} == {0, 1, 2, 3}
