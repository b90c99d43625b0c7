"""`linearsr upscale --tags` with a tag the model never trained on: a hash-encoder bundle refuses
it in one sentence before any image is read; a MiniLM bundle embeds it and logs its nearest
training tag once."""

import logging

import pytest
import torch
from PIL import Image

from linearsr.main import main
from linearsr.model.bundle import save_expert, write_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.network import LinearSR
from linearsr.model.tags import TagChecker


def bundle(folder, **cfg):
    cfg = ModelConfig.preset("cpu_tiny", width=16, depth=1, heads=2, **cfg)
    torch.manual_seed(0)
    save_expert(folder / "expert_0", LinearSR(cfg), {"step": 0})
    write_bundle(folder, [{"interval": "-inf,inf", "weights": "expert_0.safetensors"}], cfg)
    return str(folder)


@pytest.fixture
def image(tmp_path):
    Image.new("RGB", (12, 10), (120, 140, 90)).save(tmp_path / "a.png")
    return str(tmp_path / "a.png")


def test_hash_bundle_refuses_an_unseen_tag(tmp_path, image, capsys):
    b = bundle(tmp_path / "hash", tag_encoder="hash", tag_set=["grass", "sky"])
    assert main(["upscale", "--bundle", b, image, "--out", str(tmp_path / "out"), "--tags", "sky, cat"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "linearsr upscale: error: tag 'cat' was not seen in training" in err[0] and "2 training tags" in err[0]
    assert not (tmp_path / "out" / "a.png").exists()
    assert main(["upscale", "--bundle", b, image, "--out", str(tmp_path / "out"), "--tags", "Sky"]) == 0


def test_minilm_bundle_embeds_an_unseen_tag_and_names_its_nearest(tmp_path, image, caplog, monkeypatch):
    monkeypatch.setattr(TagChecker, "_seen", set())  # logged once per process: this test's own process view
    b = bundle(tmp_path / "minilm", tag_set=["airplane", "grass", "kitten"])
    with caplog.at_level(logging.INFO, logger="linearsr"):
        assert main(["upscale", "--bundle", b, image, "--out", str(tmp_path / "out"), "--tags", "cat"]) == 0
    assert "tag 'cat' is not a training tag; nearest 'kitten'" in caplog.text
    assert (tmp_path / "out" / "a.png").is_file()
