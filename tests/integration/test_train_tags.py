"""A real training run in tagger mode (Ray Job, DeepSpeed on gloo): the tagger is copied into the
run, config.json and every checkpoint name that copy and the tags it can emit, and a resume after
the source file changed keeps tagging with the run's copy."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from linearsr.cluster.jobs import Jobs
from linearsr.core import storage
from linearsr.main import main
from linearsr.model.bundle import load_bundle
from linearsr.model.tagger import Tagger
from linearsr.trainer import checkpoint as ckpt

pytestmark = pytest.mark.integration

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cpu_tiny.toml")
TINY = [  # cpu_tiny on 32 px crops, one worker of half a CPU (as test_sidecar_e2e.py)
    "data.batch_size=4", "data.crop=32", "data.val_crop=32", "data.num_workers=0", "data.shuffle_buffer=8",
    "validation.every=5", "validation.max_batches=1", "validation.image_every=0", "flow.val_points_per_interval=2",
    "cluster.num_workers=1", "cluster.cpus_per_worker=0.5", "checkpoint.every=5", "run.log_every=5",
]


def fixed_tagger(prefix, bias) -> str:
    tagger = Tagger(["sky", "grass", "cat"], thresholds=[0.0, 0.0, float("inf")])
    with torch.no_grad():
        tagger.head.weight.zero_()
        tagger.head.bias.copy_(torch.tensor(bias))
    return str(tagger.save(prefix))


def test_tagger_mode_run_keeps_its_tagger_across_a_resume(ray_cluster, tiny_shards, tmp_path):
    jobs, tag = Jobs(ray_cluster), uuid.uuid4().hex[:6]
    source = fixed_tagger(tmp_path / "tagger" / "tagger", [2.0, 1.0, 0.0])
    run = str(tmp_path / "run")

    def train(steps: int, attempt: int) -> None:
        sid = f"test-tags-{tag}-{attempt}"
        assert main(["submit", "--address", ray_cluster, "--submission-id", sid, "--config", CONFIG, "--run", run,
                     *TINY, f"data.shards={tiny_shards}", f"run.steps={steps}", "tags.source=tagger",
                     f"tags.tagger={source}"]) == 0
        info = jobs.wait(sid, timeout=600)
        assert info.status == "SUCCEEDED", jobs.logs_tail(sid, 80)

    train(5, 1)
    config = storage.read_json(os.path.join(run, "config.json"))
    assert config["tags"]["tagger"] == os.path.join(run, "tagger.safetensors")
    assert config["model"]["tag_set"] == ["grass", "sky"]  # "cat" is switched off in the tagger
    first = ckpt.latest_complete(run)
    assert ckpt.read_meta(first.url)["config"]["model"]["tag_set"] == ["grass", "sky"]

    fixed_tagger(tmp_path / "tagger" / "tagger", [2.0, 1.0, 5.0])  # the source changes; the run must not
    train(10, 2)
    assert ckpt.latest_complete(run).step == 10
    assert storage.read_json(os.path.join(run, "config.json"))["model"]["tag_set"] == ["grass", "sky"]
    assert Tagger.load(os.path.join(run, "tagger.safetensors")).emitted == ["sky", "grass"]

    assert main(["export", ckpt.latest_complete(run).url, str(tmp_path / "bundle")]) == 0
    assert load_bundle(tmp_path / "bundle").cfg.tag_set == ("grass", "sky")  # what upscale checks tags against
