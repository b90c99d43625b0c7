"""Fitting the TAG tagger's head on frozen features, and choosing its per-tag thresholds.

    photos -> K random HR crops each -> LR crops (as training makes them) -> backbone features, once
    head: object tags from photo-level labels by multiple-instance learning (the LSE pool of the
          photo's crop logits against its tags; a missing tag counts 0.3 of a present one: the
          photo lists are incomplete); degradation tags ("strong blur", "heavy noise", "jpeg
          artifacts") from exact per-crop labels: more crops of each photo go through the
          realistic degradation, whose parameters say which tags each crop earns
    thresholds: K-fold over the train photos; each fold's head scores the photos (object tags) and
          crops (degradation tags) it never saw; per tag, the lowest threshold whose out-of-fold
          precision reaches the target
          ("precision over volume"), +inf (never emitted) where none does

Everything here is deterministic given the seed. `precision_thresholds` and `tag_report` are
shared with the CNN baseline (trainer/tagger.py), which is scored the same way."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linearsr.data.config import DegradationConfig
from linearsr.data.degradations import degradation_tags, degrade_batch
from linearsr.data.degrade import bicubic_down
from linearsr.model.tagger import Tagger, lse_pool

REALISTIC = DegradationConfig(mode="realistic")  # Real-ESRGAN's published defaults
# the tag names degradation_tags gives, in its order (every threshold passed)
DEGRADATION_TAGS = tuple(degradation_tags({"blur": torch.tensor([math.inf]), "noise": torch.tensor([math.inf]),
                                           "jpeg": torch.tensor([0.0])}, REALISTIC.tags)[0])


@dataclass(frozen=True)
class FitConfig:
    crops_per_photo: int = 32  # random training crops per photo (features computed once)
    degraded_crops: int = 16  # more per photo through the realistic degradation: the degradation tags' examples (0 = none)
    crop: int = 24  # LR crop side: the demo's training crop (data.crop 96 / scale 4)
    scale: int = 4
    min_count: int = 3  # a tag needs this many train photos to be learned
    folds: int = 4  # for the out-of-fold scores the thresholds are chosen on
    # a tag is emitted only where its held-out precision reaches this. The photo tag lists are
    # incomplete (an untagged photo may show sky), so an object tag's measured precision is a lower
    # bound; the degradation labels are exact.
    precision: float = 0.6
    degradation_precision: float = 0.8
    min_hits: int = 2  # ... on at least this many held-out true positives
    steps: int = 300  # full-batch AdamW steps of the head
    lr: float = 1e-2
    l2: float = 1e-2  # on the head's weights
    negative_weight: float = 0.3  # photo tags are incomplete: an untagged photo may still show sky
    pool_r: float = 4.0
    baseline_steps: int = 300  # the CNN baseline's training steps (batch 16, as it was trained before)
    seed: int = 0

    def __post_init__(self):
        if self.degraded_crops < 0:
            raise ValueError(f"tagger degraded_crops must be >= 0, got {self.degraded_crops}")
        for name in ("crops_per_photo", "crop", "scale", "min_count", "min_hits", "steps", "baseline_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"tagger {name} must be >= 1, got {getattr(self, name)}")
        if self.folds < 2:
            raise ValueError(f"tagger folds must be >= 2 (thresholds are chosen out of fold), got {self.folds}")
        if not 0.0 < self.negative_weight <= 1.0:
            raise ValueError(f"tagger negative_weight must lie in (0, 1], got {self.negative_weight}")
        for name in ("precision", "degradation_precision"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"tagger {name} must lie in (0, 1], got {getattr(self, name)}")


def random_crops(hr: torch.Tensor, n: int, size: int, rng: random.Random) -> torch.Tensor:
    """hr [3, H, W] uint8 -> n random size x size crops [n, 3, size, size] float in [0, 1], randomly flipped."""
    _, h, w = hr.shape
    if h < size or w < size:
        raise ValueError(f"a {w}x{h} photo is smaller than the {size} px tagger training crop")
    out = []
    for _ in range(n):
        y, x = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
        c = hr[:, y:y + size, x:x + size].float() / 255
        out.append(c.flip(-1) if rng.random() < 0.5 else c)
    return torch.stack(out)


def _features(tagger: Tagger, lr: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([tagger.features(lr[i:i + batch]) for i in range(0, len(lr), batch)])


def crop_features(tagger: Tagger, photos: list[torch.Tensor], cfg: FitConfig) -> torch.Tensor:
    """Raw backbone features of `crops_per_photo` bicubic-LR crops of every photo: [P, K, 2304]."""
    rng = random.Random(cfg.seed)
    return torch.stack([_features(tagger, bicubic_down(random_crops(hr, cfg.crops_per_photo, cfg.crop * cfg.scale, rng),
                                                       cfg.scale)) for hr in photos])


def degraded_features(tagger: Tagger, photos: list[torch.Tensor], cfg: FitConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`degraded_crops` crops of every photo through the realistic degradation, their features
    [P, Kd, 2304] and exact labels [P, Kd, 3] (the DEGRADATION_TAGS their parameters earn)."""
    rng = random.Random(seed)
    feats, labels = [], []
    for p, hr in enumerate(photos):
        seeds = [rng.getrandbits(62) for _ in range(cfg.degraded_crops)]
        lr, params = degrade_batch(random_crops(hr, cfg.degraded_crops, cfg.crop * cfg.scale, rng), REALISTIC, cfg.scale, seeds)
        feats.append(_features(tagger, lr))
        tags = degradation_tags(params, REALISTIC.tags)
        labels.append(torch.tensor([[float(t in crop) for t in DEGRADATION_TAGS] for crop in tags]))
    return torch.stack(feats), torch.stack(labels)


def degradation_crops(feats: torch.Tensor, deg: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every crop of the photos with its exact degradation labels, [N, D] and [N, 3]: the bicubic
    crops (no degradation tag) and the degraded ones."""
    d_feats, d_labels = deg
    clean = feats.flatten(0, 1)
    return torch.cat([clean, d_feats.flatten(0, 1)]), torch.cat([torch.zeros(len(clean), d_labels.shape[-1]),
                                                                 d_labels.flatten(0, 1)])


def fit_head(tagger: Tagger, feats: torch.Tensor, labels: torch.Tensor, cfg: FitConfig,
             deg: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Fit tagger.head (and its feature normalisation) in place. feats [P, K, D] raw features of
    bicubic crops, labels [P, Vo] photo-level multi-hot of the object tags (the head's first Vo
    outputs); deg: the degraded crops' features and labels (degraded_features), for the last 3."""
    num_obj = labels.shape[1]
    d_feats, d_labels = degradation_crops(feats, deg) if deg is not None else (None, None)
    flat = feats.flatten(0, 1)  # the statistics of the clean crops (what the object tags see)
    with torch.no_grad():
        tagger.feat_mean.copy_(flat.mean(0))
        tagger.feat_std.copy_(flat.std(0) + 1e-5)
    torch.manual_seed(cfg.seed)
    tagger.head.reset_parameters()
    opt = torch.optim.AdamW(tagger.head.parameters(), lr=cfg.lr, weight_decay=0.0)
    weight = labels + cfg.negative_weight * (1 - labels)
    for _ in range(cfg.steps):
        pooled = lse_pool(tagger.head_logits(feats)[..., :num_obj], cfg.pool_r, dim=1)
        loss = F.binary_cross_entropy_with_logits(pooled, labels, weight=weight) + cfg.l2 * tagger.head.weight.pow(2).sum()
        if deg is not None:
            loss = loss + F.binary_cross_entropy_with_logits(tagger.head_logits(d_feats)[:, num_obj:], d_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def folds_of(n: int, k: int, seed: int) -> list[list[int]]:
    """n items into k disjoint folds of near-equal size (shuffled with the seed)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def out_of_fold(n: int, cfg: FitConfig, fit, score) -> list:
    """The score of every item (in order) by a model fitted without its fold: fit(train_idx) ->
    model, score(model, idx) -> one score per item of idx."""
    rows: dict[int, object] = {}
    for fold in folds_of(n, min(cfg.folds, n), cfg.seed):
        model = fit([i for i in range(n) if i not in set(fold)])
        for i, s in zip(fold, score(model, fold)):
            rows[i] = s
    return [rows[i] for i in range(n)]


def precision_thresholds(scores: torch.Tensor, labels: torch.Tensor, precision: float, min_hits: int) -> list[float]:
    """Per tag (column): the lowest score t such that the items scoring >= t have precision >=
    `precision` with at least `min_hits` true positives among them (the most recall at that
    precision); +inf where no threshold does. scores, labels: [N, V]."""
    out = []
    for s, y in zip(scores.T.tolist(), labels.T.tolist()):
        best = math.inf
        ranked = sorted(zip(s, y), key=lambda p: -p[0])
        hits = 0
        for i, (score, label) in enumerate(ranked):
            hits += label > 0
            tie_next = i + 1 < len(ranked) and ranked[i + 1][0] == score
            if not tie_next and hits >= min_hits and hits / (i + 1) >= precision:
                best = score
        out.append(best)
    return out


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of one tag (rank statistic, ties averaged). NaN without both classes."""
    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in torch.unique(scores):  # average ranks of ties
        tie = scores == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[labels.bool()].sum() - pos * (pos + 1) / 2) / (pos * neg))


def tag_report(vocab: list[str], scores: torch.Tensor, labels: torch.Tensor, thresholds: list[float]) -> dict:
    """Held-out scores [N, V] against labels [N, V] with the chosen thresholds: per tag its
    support, AUC, and precision / recall / accuracy of what it emits; the mean AUC over the tags with both
    classes present; micro precision / recall over all emitted tags."""
    per_tag, aucs = {}, []
    emitted = scores >= torch.tensor(thresholds)
    for j, tag in enumerate(vocab):
        y, e = labels[:, j] > 0, emitted[:, j]
        auc = roc_auc(scores[:, j], labels[:, j])
        if auc == auc:
            aucs.append(auc)
        tp = int((y & e).sum())
        per_tag[tag] = {"support": int(y.sum()), "auc": auc, "emitted": int(e.sum()), "accuracy": float((y == e).float().mean()),
                        "precision": tp / int(e.sum()) if e.any() else None,
                        "recall": tp / int(y.sum()) if y.any() else None, "on": math.isfinite(thresholds[j])}
    y, tp = labels > 0, int(((labels > 0) & emitted).sum())
    return {"items": len(labels), "mean_auc": sum(aucs) / len(aucs) if aucs else float("nan"), "tags_scored": len(aucs),
            "precision": tp / int(emitted.sum()) if emitted.any() else None,
            "recall": tp / int(y.sum()) if y.any() else None, "tags_on": sum(math.isfinite(t) for t in thresholds),
            "per_tag": per_tag}
