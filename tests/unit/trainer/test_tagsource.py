"""Where a run's tags come from: the tagger is copied into the run at its first start and a
resume tags with that copy; model.tag_set records what training can see; the photo ablation."""

import logging
import math

import pytest
import torch

from linearsr.data.config import DegradationConfig
from linearsr.model.tagger import Tagger
from linearsr.trainer.config import TrainConfig, load_config
from linearsr.trainer.tagsource import open_tag_source
from linearsr.trainer.validate import ValBatch


def fixed_tagger(path, bias, thresholds, vocab=("sky", "grass", "cat")) -> str:
    """A tagger that gives every crop the tags whose bias reaches its threshold; returns its file."""
    tagger = Tagger(list(vocab), thresholds=thresholds)
    with torch.no_grad():
        tagger.head.weight.zero_()
        tagger.head.bias.copy_(torch.tensor(bias))
    return str(tagger.save(path))


def config(tagger: str = "", source: str = "tagger", **model) -> TrainConfig:
    cfg = TrainConfig().replace(tags={"source": source, "tagger": tagger})
    return cfg.replace(model=model) if model else cfg


def test_first_start_copies_the_tagger_and_a_resume_keeps_its_copy(tmp_path, caplog):
    source = fixed_tagger(tmp_path / "t" / "tagger", [2.0, 1.0, 0.0], [0.0, 0.0, math.inf])
    run = str(tmp_path / "run")
    cfg, tags = open_tag_source(config(source), run, rank=0)
    assert cfg.tags.tagger == str(tmp_path / "run" / "tagger.safetensors") and (tmp_path / "run" / "tagger.json").is_file()
    assert cfg.model.tag_set == ("grass", "sky")  # what the tagger can emit; "cat" is switched off
    assert tags({"lr": torch.rand(2, 3, 24, 24), "tags": [["photo tag"], []]}) == [["sky", "grass"]] * 2
    # the tagger file changes (now it says "cat"): the run keeps tagging as it started
    fixed_tagger(tmp_path / "t" / "tagger", [2.0, 1.0, 5.0], [0.0, 0.0, 0.0])
    with caplog.at_level(logging.WARNING, logger="linearsr.trainer.tagsource"):
        again, tags = open_tag_source(config(source), run, rank=0)
    assert again == cfg and "differs from the tagger this run started with" in caplog.text
    assert tags({"lr": torch.rand(1, 3, 24, 24), "tags": [[]]}) == [["sky", "grass"]]
    # the resolved config (what config.json and every expert carry) resolves to itself
    assert open_tag_source(cfg, run, rank=0)[0] == cfg


def test_only_rank_0_writes_the_copy(tmp_path):
    source = fixed_tagger(tmp_path / "tagger", [2.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    cfg, _ = open_tag_source(config(source), str(tmp_path / "run"), rank=1)
    assert cfg.model.tag_set == ("cat", "grass", "sky") and not (tmp_path / "run").exists()


def test_validation_batches_get_the_tags_training_gives(tmp_path):
    source = fixed_tagger(tmp_path / "tagger", [2.0, -1.0, -1.0], [0.0, 0.0, 0.0])
    _, tags = open_tag_source(config(source), str(tmp_path / "run"), rank=0)
    batches = [ValBatch(torch.rand(2, 3, 96, 96), torch.rand(2, 3, 24, 24), [["fog"], ["lake"]], torch.zeros(2))]
    tags.relabel(batches)
    assert batches[0].tags == [["sky"], ["sky"]]


def test_photo_mode_keeps_the_shard_tags_and_records_them(tiny_shards, tmp_path):
    cfg = config(source="photo").replace(data={"shards": tiny_shards, "degradation": DegradationConfig(mode="bicubic")})
    cfg, tags = open_tag_source(cfg, str(tmp_path / "run"), rank=0)
    assert cfg.model.tag_set == ("blue", "red", "synthetic")
    assert tags({"lr": torch.rand(1, 3, 8, 8), "tags": [["red", "synthetic"]]}) == [["red", "synthetic"]]


def test_a_config_whose_tag_set_disagrees_with_its_source_is_refused(tmp_path):
    source = fixed_tagger(tmp_path / "tagger", [2.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"model.tag_set of the config differs.*new \['cat', 'grass'\]"):
        open_tag_source(config(source, tag_set=["sky"]), str(tmp_path / "run"), rank=0)


def test_tag_source_mistakes_are_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="tags.source='tagger' needs tags.tagger"):
        config()
    with pytest.raises(ValueError, match="tags.source must be"):
        config(source="captions")
    with pytest.raises(FileNotFoundError, match="tags.tagger .* does not exist"):
        open_tag_source(config(str(tmp_path / "none.safetensors")), str(tmp_path / "run"), rank=0)
    silent = fixed_tagger(tmp_path / "silent", [0.0, 0.0, 0.0], [math.inf] * 3)
    with pytest.raises(ValueError, match="emits no tag"):
        open_tag_source(config(silent), str(tmp_path / "run"), rank=0)


def test_a_relative_tagger_path_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["tags.source=tagger", "tags.tagger=runs/tagger/tagger.safetensors"])
    assert cfg.tags.tagger == str(tmp_path / "runs" / "tagger" / "tagger.safetensors")


def test_photo_mode_adds_the_degradation_tags_a_realistic_crop_earns(tiny_shards, tmp_path):
    cfg = config(source="photo").replace(data={"shards": tiny_shards, "degradation": DegradationConfig(mode="realistic")})
    cfg, tags = open_tag_source(cfg, str(tmp_path / "run"), rank=0)
    assert cfg.model.tag_set == ("blue", "heavy noise", "jpeg artifacts", "red", "strong blur", "synthetic")
    params = {"blur": torch.tensor([3.0, 0.5, float("nan")]), "noise": torch.tensor([1.0, 20.0, float("nan")]),
              "jpeg": torch.tensor([90.0, 30.0, float("nan")])}  # the last one: a real LR/HR pair
    got = tags({"lr": torch.rand(3, 3, 8, 8), "tags": [["red"], ["blue"], ["red"]], "degradation": params})
    assert got == [["red", "strong blur"], ["blue", "heavy noise", "jpeg artifacts"], ["red"]]
