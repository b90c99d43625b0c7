"""Weights on disk: expert round trip, bundle manifest, clear errors."""

import json
import math

import pytest
import torch

from linearsr.model.bundle import load_bundle, load_expert, save_expert, write_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.flow import bisect
from linearsr.model.network import LinearSR
from linearsr.model.sampler import sample

CFG = ModelConfig.preset("cpu_tiny", width=32, depth=1, heads=2)


def model(seed=0, cfg=CFG) -> LinearSR:
    torch.manual_seed(seed)
    m = LinearSR(cfg)
    with torch.no_grad():
        m.final.weight.normal_(0, 0.05)
    return m


def test_expert_round_trip(tmp_path):
    m = model()
    path = save_expert(tmp_path / "e0", m, {"step": 120, "interval": "-inf,-3", "val_loss": 0.5})
    assert path.name == "e0.safetensors"
    meta = json.loads((tmp_path / "e0.json").read_text())
    assert meta["step"] == 120 and meta["interval"] == "-inf,-3" and meta["model"]["width"] == 32
    loaded = load_expert(path)
    assert loaded.cfg == CFG and not loaded.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not any(tmp_path.glob(".*tmp"))  # nothing half-written left behind


def test_config_mismatch_names_the_key(tmp_path):
    path = save_expert(tmp_path / "e0", model())
    with pytest.raises(ValueError, match="depth: 2 -> 1"):
        load_expert(path, expect=ModelConfig.preset("cpu_tiny", width=32, depth=2, heads=2))
    meta = json.loads((tmp_path / "e0.json").read_text())
    meta["model"]["width"] = 48
    (tmp_path / "e0.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit the model config: .*wrong shape"):
        load_expert(path)
    meta["model"]["depth"] = 2
    meta["model"]["width"] = 32
    (tmp_path / "e0.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing blocks\.1\."):
        load_expert(path)
    meta["model"]["colour"] = "red"
    (tmp_path / "e0.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown model config key.*colour"):
        load_expert(path)


def test_bundle_round_trip_routes_to_the_saved_experts(tmp_path):
    intervals = bisect(-6, 6, 2)
    experts = []
    for i, iv in enumerate(intervals):
        save_expert(tmp_path / f"expert_{i}", model(i), {"interval": iv, "step": 10})
        experts.append({"interval": [iv.lo, iv.hi], "weights": f"expert_{i}.safetensors", "val_loss": 0.1 * i})
    write_bundle(tmp_path, experts[::-1], CFG, knee_step=10)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["experts"][0]["interval"] == ["-inf", "-3"] and manifest["experts"][-1]["interval"] == ["3", "inf"]
    assert manifest["scale"] == 4 and manifest["tagger"] is None and manifest["knee_step"] == 10
    moe = load_bundle(tmp_path)
    assert moe.intervals == intervals and moe.tagger is None
    for i in range(4):
        assert torch.equal(moe.experts[i].final.weight, model(i).final.weight)
    lr = torch.rand(1, 3, 4, 4)
    res = sample(moe, lr, steps=4)  # t = 1, .75, .5, .25 -> lambda = -inf, -2.2, 0, 2.2
    assert [i for *_, i in res.route] == [0, 1, 2, 2]


def test_single_safetensors_is_a_one_expert_bundle(tmp_path):
    path = save_expert(tmp_path / "knee", model(3))
    moe = load_bundle(path)
    assert len(moe.experts) == 1 and moe.intervals[0].lo == -math.inf


def test_bundle_errors(tmp_path):
    save_expert(tmp_path / "a", model())
    with pytest.raises(ValueError, match="leave a gap"):
        write_bundle(tmp_path, [{"interval": ["-inf", "0"], "weights": "a.safetensors"},
                                {"interval": ["1", "inf"], "weights": "a.safetensors"}], CFG)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        write_bundle(tmp_path, [{"interval": "-inf,inf", "weights": "missing.safetensors"}], CFG)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_bundle(tmp_path)
    assert not (tmp_path / "manifest.json").exists()
    other = ModelConfig.preset("cpu_tiny", width=32, depth=1, heads=4)
    write_bundle(tmp_path, [{"interval": "-inf,inf", "weights": "a.safetensors"}], other)
    with pytest.raises(ValueError, match="heads: 4 -> 2"):
        load_bundle(tmp_path)


def test_written_files_are_readable_by_others(tmp_path):
    """Bundles and upscaled images go to shared storage: not the 0600 of a temp file."""
    import os
    import stat

    import torch

    from linearsr.core.storage import write_json
    from linearsr.model.imageio import save_png

    old = os.umask(0o022)
    try:
        write_json(str(tmp_path / "m.json"), {"a": 1})
        save_png(tmp_path / "x.png", torch.zeros(3, 4, 4))
    finally:
        os.umask(old)
    for name in ("m.json", "x.png"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644
