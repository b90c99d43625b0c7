"""The latent preset end to end on CPU: configs/base_x4_latent.toml (shrunk by overrides) with an
AutoencoderDC built from a config with random weights and saved as a folder, through the same
loading code as the real DC-AE: calibrate -> train (a Ray Job) -> export -> upscale (exact tiles)."""

import os
import tomllib
import uuid

import numpy as np
import pytest
from PIL import Image

from linearsr.main import main

pytestmark = pytest.mark.integration

PRESET = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "base_x4_latent.toml")


def test_latent_preset_calibrates_trains_exports_and_upscales(ray_cluster, tiny_shards, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from linearsr.cluster.jobs import Jobs
    from linearsr.model.autoencoder import TINY_DC_AE
    from linearsr.model.bundle import load_bundle
    from linearsr.trainer import checkpoint as ckpt

    diffusers.AutoencoderDC(**TINY_DC_AE).save_pretrained(tmp_path / "dcae")
    preset = tmp_path / "latent.toml"
    preset.write_text(open(PRESET).read())
    small = [f"model.ae_path={tmp_path / 'dcae'}", "model.width=16", "model.depth=1", "model.heads=2",
             "model.max_tags=8", f"data.shards={tiny_shards}", "data.crop=32", "data.val_crop=32", "data.batch_size=4",
             "data.num_workers=0", "data.shuffle_buffer=8", "data.max_tags=8", "data.val_max_samples=4",
             "deepspeed.precision=fp32", "optim.ema_decay=0", "optim.warmup_steps=1", "run.steps=4", "run.log_every=2",
             "validation.every=2", "validation.max_batches=1", "validation.image_every=0", "checkpoint.every=4",
             "cluster.num_workers=1", "cluster.cpus_per_worker=0.5", "cluster.use_gpu=false"]
    assert main(["calibrate", "--config", str(preset), "--samples", "8", *small]) == 0
    scale = tomllib.loads(preset.read_text())["model"]["residual_scale"]
    assert scale > 0 and scale != 1.0  # measured on the DC-AE's latents, written into the preset

    run, sid = tmp_path / "run", f"test-latent-{uuid.uuid4().hex[:6]}"
    assert main(["submit", "--address", ray_cluster, "--submission-id", sid, "--config", str(preset), *small,
                 "--run", str(run)]) == 0
    jobs = Jobs(ray_cluster)
    info = jobs.wait(sid, timeout=600)
    assert info.status == "SUCCEEDED", jobs.logs_tail(sid, 80)

    bundle = tmp_path / "bundle"
    assert main(["export", ckpt.url_of(str(run), 4), str(bundle)]) == 0
    moe = load_bundle(bundle)
    assert moe.cfg.autoencoder == "latent" and moe.cfg.residual_scale == scale and moe.experts[0].ae.factor == 2
    Image.fromarray((np.random.default_rng(0).random((22, 18, 3)) * 255).astype(np.uint8)).save(tmp_path / "lr.png")
    assert main(["upscale", "--bundle", str(bundle), "--out", str(tmp_path / "sr"), "--tile", "8", "--tile-mode", "exact",
                 str(tmp_path / "lr.png")]) == 0
    assert Image.open(tmp_path / "sr" / "lr.png").size == (72, 88)
