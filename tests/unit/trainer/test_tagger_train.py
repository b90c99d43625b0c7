"""`linearsr tagger train|eval`: thresholds for precision, crop-level tags learned from photo-level
labels on frozen ImageNet features, the shipped photo tags, the CNN baseline, the bundle."""

import json
import math
import os
import random

import pytest
import torch

from linearsr.main import main
from linearsr.model.bundle import load_bundle, read_manifest, save_expert, write_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.flow import FULL_RANGE
from linearsr.model.network import LinearSR
from linearsr.model.tagger import Tagger
from linearsr.trainer.quality import lpips_weights_path
from linearsr.trainer.tagger import cnn_baseline, new_tagger
from linearsr.trainer.tagger_fit import FitConfig, crop_features, fit_head, folds_of, precision_thresholds, random_crops, roc_auc
from tests.support.assets import require

PHOTO_SHARDS = os.path.join("runs", "data", "shards")
WEIGHTS = os.path.join("runs", "weights", "lpips_alexnet.safetensors")


def test_roc_auc_against_hand_computed_values():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(s, torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.75)
    assert roc_auc(s, torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(1.0)
    assert roc_auc(torch.ones(4), torch.tensor([0.0, 1.0, 0.0, 1.0])) == pytest.approx(0.5)


def test_thresholds_take_the_most_recall_that_keeps_the_precision():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]]).T
    labels = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]]).T
    assert precision_thresholds(scores, labels, 0.75, 2) == [pytest.approx(0.6)]  # top 4: 3 of 4 right
    assert precision_thresholds(scores, labels, 1.0, 2) == [pytest.approx(0.8)]  # only the top 2 are all right
    assert precision_thresholds(scores, labels, 0.75, 4) == [math.inf]  # 4 hits never come at that precision
    # a threshold never splits tied scores: 0.9 admits both, and only one of them is right
    assert precision_thresholds(torch.tensor([[0.9, 0.9, 0.1]]).T, torch.tensor([[1.0, 0.0, 1.0]]).T, 0.9, 1) == [math.inf]


def test_folds_are_disjoint_and_cover_everything():
    folds = folds_of(10, 4, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(10)) and {len(f) for f in folds} == {2, 3}


@pytest.fixture(scope="module")
def alexnet_weights():
    assert os.path.exists(WEIGHTS), f"ImageNet AlexNet weights missing at {WEIGHTS}: `make weights` writes them (make test does)"
    return WEIGHTS


@pytest.fixture(scope="module")
def photos():
    skd = pytest.importorskip("skimage.data")
    return {k: torch.from_numpy(getattr(skd, k)().copy()).permute(2, 0, 1).contiguous() for k in ("astronaut", "coffee", "chelsea")}


def test_crop_level_tags_from_photo_level_labels(photos, alexnet_weights, one_thread):
    """Each training 'photo' is two real photos side by side, tagged with both: the head must
    learn which crops show which (multiple-instance learning), and tag crops of unseen regions."""
    names = list(photos)
    halves = {k: v[:, :, : v.shape[2] // 2] for k, v in photos.items()}  # left halves for training
    pairs = [(a, b) for a in names for b in names if a != b]
    train = [torch.cat([halves[a][:, :300, :200], halves[b][:, :300, :200]], dim=2) for a, b in pairs]
    cfg = FitConfig(crops_per_photo=12, steps=150, seed=0)
    tagger = new_tagger(names, cfg, alexnet_weights)
    feats = crop_features(tagger, train, cfg)
    labels = torch.tensor([[float(n in pair) for n in names] for pair in pairs])
    fit_head(tagger, feats, labels, cfg)
    g = random.Random(1)
    right = 0
    for k, img in photos.items():  # crops of the right halves: never seen
        lr = torch.nn.functional.interpolate(random_crops(img[:, :, img.shape[2] // 2:], 6, 96, g), size=24, mode="bicubic",
                                             antialias=True).clamp(0, 1)
        right += sum(int(tagger(lr)[i].argmax()) == names.index(k) for i in range(6))
    assert right >= 14  # of 18 crops; a guess is right 1 time in 3


@pytest.fixture(scope="module")
def photo_shards():
    require(os.path.join(PHOTO_SHARDS, "manifest.json"), "data")
    require(lpips_weights_path(), "weights")  # the tagger's ImageNet AlexNet
    return PHOTO_SHARDS


@pytest.fixture()
def bundle(tmp_path):
    model = LinearSR(ModelConfig.preset("cpu_tiny"))
    save_expert(tmp_path / "expert_0", model, {"step": 0, "interval": FULL_RANGE.key})
    write_bundle(tmp_path, [{"interval": FULL_RANGE.key, "weights": "expert_0.safetensors", "val_loss": 1.0}], model.cfg)
    return tmp_path


def test_tagger_learns_the_shipped_tags_and_goes_into_a_bundle(photo_shards, alexnet_weights, bundle, tmp_path, capsys):
    report_file = tmp_path / "report.json"
    assert main(["tagger", "train", "--shards", photo_shards, "--bundle", str(bundle), "--no-baseline",
                 "--crops-per-photo", "8", "--degraded-crops", "4", "--steps", "100", "--json", str(report_file)]) == 0
    out = capsys.readouterr().out
    assert "| sky |" in out and "mean AUC" in out
    report = json.loads(report_file.read_text())["tagger"]
    # the val photos were never seen: chance AUC is 0.5
    assert report["val"]["tags_scored"] >= 3 and report["val"]["mean_auc"] > 0.6
    assert report["cv"]["items"] == 42 and set(report["cv"]["per_tag"]) == set(report["val"]["per_tag"])
    # degradation tags: exact labels per crop, scored on val-photo crops the tagger never saw (72 crops of
    # 6 photos: measured 0.66 there, 0.73 out of fold on the 504 train crops; chance is 0.5)
    deg = report["degradation_val"]
    assert set(deg["per_tag"]) == {"strong blur", "heavy noise", "jpeg artifacts"} and deg["items"] == 6 * (8 + 4)
    assert deg["mean_auc"] > 0.6 and report["degradation_cv"]["mean_auc"] > 0.7, (deg, report["degradation_cv"])
    manifest = read_manifest(bundle)
    assert manifest["tagger"] == "tagger.safetensors" and len(manifest["experts"]) == 1
    moe = load_bundle(bundle)
    assert "sky" in moe.tagger.vocab and moe.tagger.vocab[-3:] == ["strong blur", "heavy noise", "jpeg artifacts"]
    # eval scores the saved tagger the same way
    assert main(["tagger", "eval", "--shards", photo_shards, "--tagger", str(bundle / "tagger.safetensors"),
                 "--no-baseline"]) == 0
    assert f"val mean AUC {report['val']['mean_auc']:.3f}" in capsys.readouterr().out


def test_cnn_baseline_is_scored_like_the_tagger(photos, one_thread):
    names = list(photos)
    train = [(img, [k]) for k, img in photos.items()] * 2
    val = [(img, [k]) for k, img in photos.items()]
    report = cnn_baseline(train, val, names, FitConfig(folds=2, baseline_steps=20, min_hits=1))
    assert set(report) == {"cv", "val"} and report["cv"]["items"] == 6 and report["val"]["items"] == 3
    assert set(report["val"]["per_tag"]) == set(names)


def test_bad_tagger_invocations_are_one_line_errors(tiny_shards, tmp_path, capsys):
    assert main(["tagger", "train", "--shards", str(tiny_shards)]) == 1
    assert "--out PREFIX or --bundle DIR" in capsys.readouterr().err
    assert main(["tagger", "train", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()) == 1
    assert main(["tagger", "train", "--shards", str(tiny_shards), "--bundle", str(tmp_path / "nobundle")]) == 1
    assert main(["tagger", "eval", "--shards", str(tiny_shards)]) == 1
    assert "--tagger FILE" in capsys.readouterr().err
    assert main(["tagger", "train", "--shards", str(tiny_shards), "--out", str(tmp_path / "t"), "--precision", "0"]) == 1
    assert "precision must lie in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a linearsr-tagger/2"):
        (tmp_path / "x.json").write_text("{}")
        Tagger.load(tmp_path / "x.safetensors")


def test_bench_times_the_tagger_beside_a_training_step(tmp_path, capsys, one_thread):
    Tagger(["sky"]).save(tmp_path / "tagger")
    assert main(["tagger", "bench", "--tagger", str(tmp_path / "tagger.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "tagger on 8 LR crops:" in out and "cpu_tiny training step on the same batch" in out and "ratio" in out
