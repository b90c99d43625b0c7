"""A MoE bundle samples on its training shift's grid, the ablation's N-step row runs every leaf
expert at least once, and the evaluation report prints each variant's route."""

import json

import pytest
import torch
from PIL import Image
from skimage import data

from linearsr.model.bundle import load_bundle, save_expert, write_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.flow import FlowConfig, find_interval, lambda_of_t, sampling_times
from linearsr.model.network import LinearSR
from linearsr.model.sampler import sample
from linearsr.trainer.evaluate import evaluate, every_expert_steps

FLOW = FlowConfig(shift=3.0)  # cpu_tiny's flow: leaves split at -3.55, -2.2, -0.85


@pytest.fixture(scope="module")
def moe_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    cfg = ModelConfig.preset("cpu_tiny", width=16, depth=1, heads=1)
    entries = []
    for i, iv in enumerate(FLOW.intervals()):
        torch.manual_seed(i)
        save_expert(root / f"expert_{i}", LinearSR(cfg), {"step": 0, "interval": iv.key})
        entries.append({"interval": iv.key, "weights": f"expert_{i}.safetensors", "val_loss": 1.0})
    write_bundle(root, entries, cfg, extra={"sampling": {"shift": FLOW.shift}})
    return root


def test_a_bundle_samples_on_its_training_shifts_grid(moe_bundle):
    moe = load_bundle(moe_bundle)
    assert moe.shift == 3.0
    res = sample(moe, torch.rand(1, 3, 8, 8), steps=10)
    assert [t for t, _, _ in res.route] == pytest.approx(sampling_times(10, 3.0)[:-1])
    assert res.route[1][0] > 0.9  # shift 3 spends more of its steps at high noise than the even grid (0.9)
    assert [i for t, _, i in res.route] == [find_interval(moe.intervals, lambda_of_t(t)) for t, _, _ in res.route]


def test_the_n_step_row_runs_every_leaf_and_the_report_prints_the_route(moe_bundle, tmp_path):
    assert every_expert_steps(str(moe_bundle), at_least=2) == 5  # the fewest steps that reach every leaf
    steps = every_expert_steps(str(moe_bundle))
    assert steps == 10
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(data.astronaut()[:64, :64]).save(hr / "a.png")
    m = evaluate(str(moe_bundle), str(hr), str(tmp_path / "out"), steps=steps, tb=False)
    route = m["routes"][f"LinearSR {steps}-step"]
    assert route.endswith("experts run: 0, 1, 2, 3 of 4") and route.startswith("t 1.00 -> e0, t 0.96 -> e0")
    assert m["routes"]["LinearSR 1-NFE"] == "t 1.00 -> e0; experts run: 0 of 4"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Routes" in report and f"- LinearSR {steps}-step: {route}" in report
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["routes"] == m["routes"]


def test_rewriting_a_bundle_in_place_keeps_its_shift_and_tree(moe_bundle):
    from linearsr.model.bundle import read_manifest

    manifest = read_manifest(moe_bundle)
    write_bundle(moe_bundle, manifest["experts"], manifest["model"], extra={"sampling": {"shift": 3.0},
                                                                           "tree": {"depth": 2}})
    write_bundle(moe_bundle, manifest["experts"], manifest["model"])  # as adding a tagger does
    assert read_manifest(moe_bundle)["tree"] == {"depth": 2} and load_bundle(moe_bundle).shift == 3.0
