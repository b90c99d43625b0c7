import pytest
import torch

from linearsr.model.config import ModelConfig
from linearsr.model.network import LinearSR


@pytest.mark.parametrize(
    "field, value",
    [("width", 4), ("heads", 3), ("attention", "flash"), ("mixer", "conv"), ("autoencoder", "vq"),
     ("tag_dropout", 1.5), ("scale", 0), ("patch_size", 0), ("tag_encoder", "clip")],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        ModelConfig.preset("cpu_tiny", **{field: value})


def test_latent_needs_a_path():
    with pytest.raises(ValueError, match="model.ae_path"):
        ModelConfig(autoencoder="latent")


def test_unknown_preset_and_unknown_key():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown model config key.*colour"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "colour": 1})


def test_round_trip_and_diff():
    cfg = ModelConfig.preset("cpu_tiny")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.preset("cpu_tiny", depth=3).diff(cfg) == ["depth: 3 -> " + repr(cfg.depth)]


def test_base_preset_is_sana_600m_sized():
    cfg = ModelConfig.preset("base")
    assert (cfg.width, cfg.depth, cfg.head_dim) == (1152, 28, 32)
    with torch.device("meta"):  # count without allocating 2.4 GB
        n = LinearSR(cfg).num_params()
    assert 0.5e9 < n < 0.75e9
