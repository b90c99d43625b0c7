"""The experiment config: presets load, overrides apply, bad input is named, JSON round-trips."""

import glob
import json
import os

import pytest

from linearsr.model.config import ModelConfig
from linearsr.trainer.config import TrainConfig, config_text, load_config

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
TINY = os.path.join(ROOT, "configs", "cpu_tiny.toml")
BASE = os.path.join(ROOT, "configs", "base_x4.toml")


def test_presets_load_with_their_models():
    tiny = load_config(TINY)
    assert tiny.model == ModelConfig.preset("cpu_tiny")
    assert (tiny.cluster.num_workers, tiny.deepspeed.zero_stage, tiny.deepspeed.precision) == (2, 2, "fp32")
    assert tiny.run.steps // tiny.validation.every >= 12  # enough points for the knee analysis
    base = load_config(BASE)
    assert base.model == ModelConfig.preset("base")
    assert (base.cluster.num_workers, base.cluster.use_gpu, base.deepspeed.precision) == (4, True, "bf16")
    assert base.data.shards.startswith("s3://")


def test_overrides_apply_with_types():
    cfg = load_config(TINY, ["optim.lr=2e-4", "run.steps=50", "run.name=other", "deepspeed.zero_stage=3", "optim.ema_decay=0",
                             "optim.betas=[0.8, 0.95]", "checkpoint.keep=3", "data.degradation.jpeg_quality=[50, 90]"])
    assert cfg.optim.lr == 2e-4 and cfg.run.steps == 50 and cfg.run.name == "other"
    assert cfg.deepspeed.zero_stage == 3 and cfg.optim.betas == (0.8, 0.95) and cfg.checkpoint.keep == 3
    assert cfg.data.degradation.jpeg_quality == (50, 90)
    assert cfg.run_url == "runs/other"


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("optimiser.lr=1", "optimiser"),
    ("model.widht=3", "model.widht"),
])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
        load_config(TINY, [override])


@pytest.mark.parametrize("override, message", [
    ("run.steps=many", "'run.steps' must be an integer"),
    ("optim.lr=fast", "'optim.lr' must be a number"),
    ("deepspeed.zero_stage=1", "'deepspeed.zero_stage' is 1; choose one of 2, 3"),
    ("deepspeed.precision=fp16", "'deepspeed.precision'"),
    ("cluster.use_gpu=maybe", "'cluster.use_gpu' must be true or false"),
])
def test_wrong_type_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, [override])


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=0"], "optim.lr must be > 0"),
    (["checkpoint.every=15"], "checkpoint.every=15 must be a multiple of validation.every"),
    (["validation.image_every=30"], "validation.image_every must be 0"),
    (["finetune.t_interval=3,0"], "lo < hi"),
    (["finetune.t_interval=abc"], "is not 'LO,HI'"),
    (["optim.ema_decay=0.99", "deepspeed.zero_stage=3"], "needs deepspeed.zero_stage=2"),
    (["run.url=s3://AKIA:secret@bucket/run"], "run.url must not contain credentials"),
    (["cluster.num_workers=0"], "cluster.num_workers must be >= 1"),
    (["model.scale=2"], "model.scale=2 and data.scale=4 must match"),
])
def test_impossible_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, overrides)


def test_resolved_json_round_trips_and_keeps_esgf_opaque(tmp_path):
    cfg = load_config(TINY, ["esgf.experts.steps=40", "finetune.t_interval=-inf,-3", "faults.nan_at_step=5"])
    path = tmp_path / "config.json"
    path.write_text(config_text(cfg))
    again = load_config(str(path))
    assert again == cfg
    assert again.esgf["experts"]["steps"] == 40 and again.esgf["poll_seconds"] == 5  # the preset's table, overridden
    assert again.interval.key == "-inf,-3"
    assert json.loads(path.read_text())["finetune"]["t_interval"] == "-inf,-3"


def test_defaults_are_inert_and_missing_file_is_named(tmp_path):
    cfg = TrainConfig()
    assert cfg.faults.nan_at_step == 0 and cfg.faults.die_at_step == 0 and cfg.finetune.init == ""
    assert load_config(TINY, ["faults.nan_at_step=5", "faults.nan_at_step=0"]).faults.nan_at_step == 0  # reset
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(str(bad))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml"))))
def test_every_shipped_preset_trains_the_1nfe_input_and_has_an_esgf_table(path):
    import torch

    from linearsr.ckpt_analysis.config import check_config

    cfg = load_config(path)
    assert 0.02 <= cfg.flow.t1_fraction <= 0.25, "a share of every batch at t = 1 (pure noise): the 1-NFE input"
    t = cfg.flow.sample_t(1000, generator=torch.Generator().manual_seed(0))
    assert (t == 1.0).float().mean().item() == pytest.approx(cfg.flow.t1_fraction, abs=0.002)
    esgf = check_config(cfg.to_dict())
    assert esgf.stop_at_knee and esgf.experts.steps > 0
    assert cfg.optim.schedule == "constant"  # the knee, not a cosine tied to run.steps, ends the pretrain
    tree = load_config(path, esgf.experts.trainer_overrides())
    assert tree.optim.lr < cfg.optim.lr and tree.optim.schedule == "cosine"  # experts: a lower LR, annealed
    assert tree.cluster.num_workers <= cfg.cluster.num_workers


def test_base_x4_experts_are_a_few_percent_of_the_pretrain_and_share_its_gpus():
    from linearsr.ckpt_analysis.config import esgf_from_config

    cfg = load_config(BASE)
    esgf = esgf_from_config(cfg.to_dict())
    assert 0.05 <= esgf.experts.steps / cfg.run.steps <= 0.10
    assert esgf.experts.share_workers and cfg.optim.ema_decay > 0 and esgf.knee.confidence >= 1
