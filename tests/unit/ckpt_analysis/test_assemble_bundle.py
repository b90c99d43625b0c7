"""The bundle the sidecar writes describes the experts it holds: its model config is the one the
experts were trained with, even when the run's config.json (as the sidecar first read it) lacked
what the trainer resolved at start (model.tag_set from the run's tagger)."""

import torch

from linearsr.ckpt_analysis.experts import Chosen, assemble_bundle
from linearsr.model.bundle import load_bundle, read_manifest, save_expert
from linearsr.model.config import ModelConfig
from linearsr.model.flow import bisect
from linearsr.model.network import LinearSR
from linearsr.trainer.rundir import RunDir


def test_the_bundle_takes_its_model_config_from_the_exported_experts(tmp_path):
    trained = ModelConfig.preset("cpu_tiny", tag_encoder="hash", tag_set=["sky", "strong blur"])
    torch.manual_seed(0)
    model = LinearSR(trained)

    def export(ckpt_url, out_prefix):  # what export_checkpoint writes: the weights + the config they trained with
        save_expert(out_prefix, model, {"step": 5, "weights": "ema", "checkpoint": ckpt_url})

    intervals = bisect(-6.0, 6.0, 1)
    chosen = [Chosen(iv, f"ckpt-{i}", 5, 0.5, f"L1-{i}") for i, iv in enumerate(intervals)]
    stale = {"model": {**trained.to_dict(), "tag_set": []}}  # config.json before the trainer resolved tag_set
    run = RunDir(str(tmp_path / "run"))
    url = assemble_bundle(run, stale, chosen, knee_step=100, export=export)
    assert read_manifest(url)["model"]["tag_set"] == ["sky", "strong blur"]
    moe = load_bundle(url)  # refused before: "expert ... differs from the bundle's model config: tag_set"
    assert len(moe.experts) == 2 and moe.experts[0].cfg.tag_set == ("sky", "strong blur")
