"""`linearsr tagger train`: the TAG tagger learns the shipped photo tags and lands in a bundle."""

import json
import os

import pytest
import torch

from linearsr.main import main
from linearsr.model.bundle import load_bundle, read_manifest, save_expert, write_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.flow import FULL_RANGE
from linearsr.model.network import LinearSR
from linearsr.trainer.tagger import roc_auc, train_tagger

PHOTO_SHARDS = os.path.join("runs", "data", "shards")


def test_roc_auc_against_hand_computed_values():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(s, torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.75)
    assert roc_auc(s, torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(1.0)
    assert roc_auc(torch.ones(4), torch.tensor([0.0, 1.0, 0.0, 1.0])) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def photo_shards():
    assert os.path.exists(os.path.join(PHOTO_SHARDS, "manifest.json")), \
        f"real photo shards missing at {PHOTO_SHARDS}: `make data` builds them (make test does)"
    return PHOTO_SHARDS


def test_tagger_learns_the_shipped_tags_on_unseen_photos(photo_shards):
    tagger, scores = train_tagger(photo_shards, steps=200, seed=1)
    # scored on the val photos, which the tagger never saw: chance AUC is 0.5, and the prior
    # guess (always the most frequent tag) is what top-1 precision must beat
    assert scores["samples"] >= 3 and scores["tags_scored"] >= 5
    assert scores["mean_auc"] > 0.6
    assert scores["top1_precision"] > scores["prior_top1_precision"]
    assert scores["train_loss_last"] < 0.5 * scores["train_loss_first"]
    assert "sky" in tagger.vocab


@pytest.fixture()
def bundle(tmp_path):
    model = LinearSR(ModelConfig.preset("cpu_tiny"))
    save_expert(tmp_path / "expert_0", model, {"step": 0, "interval": FULL_RANGE.key})
    write_bundle(tmp_path, [{"interval": FULL_RANGE.key, "weights": "expert_0.safetensors", "val_loss": 1.0}], model.cfg)
    return tmp_path


def test_tagger_goes_into_a_bundle(photo_shards, bundle, capsys):
    assert main(["tagger", "train", "--shards", photo_shards, "--bundle", str(bundle), "--steps", "5"]) == 0
    manifest = read_manifest(bundle)
    assert manifest["tagger"] == "tagger.safetensors"
    assert len(manifest["experts"]) == 1
    moe = load_bundle(bundle)
    assert moe.tagger is not None and "sky" in moe.tagger.vocab
    assert "held-out mean AUC" in capsys.readouterr().out


def test_bad_tagger_invocations_are_one_line_errors(tiny_shards, tmp_path, capsys):
    assert main(["tagger", "train", "--shards", str(tiny_shards)]) == 1
    assert "--out PREFIX or --bundle DIR" in capsys.readouterr().err
    assert main(["tagger", "train", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()) == 1
    assert main(["tagger", "train", "--shards", str(tiny_shards), "--bundle", str(tmp_path / "nobundle")]) == 1
