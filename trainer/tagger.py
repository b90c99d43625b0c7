"""`linearsr tagger train|eval`: the TAG tagger on frozen ImageNet features, against the CNN baseline.

    linearsr tagger train --shards runs/data/shards --out runs/tagger/tagger [--bundle DIR]
    linearsr tagger eval  --shards runs/data/shards --tagger runs/tagger/tagger.safetensors
    linearsr tagger bench --tagger runs/tagger/tagger.safetensors

train: the head is fitted on the train photos' tags (trainer/tagger_fit.py), per-tag thresholds
are chosen out of fold for precision, and the tagger is written (PREFIX.safetensors + .json; with
`--bundle DIR` into the bundle, whose manifest then names it). Both commands print, per tag,
the held-out precision / recall and AUC on the val photos (which neither tagger saw, through the
same windows-and-pool path `linearsr upscale` uses) and the out-of-fold ones on the train photos,
beside the CNN baseline (model/tagger.py's CNNTagger: whole LR image, trained from scratch)
fitted and scored the same way on the same split (`--no-baseline` skips it)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from linearsr.data.degrade import bicubic_down, modcrop
from linearsr.data.reader import Stats, decode, iter_samples
from linearsr.model.bundle import read_manifest as read_bundle_manifest
from linearsr.model.bundle import write_bundle
from linearsr.model.tagger import DEGRADATION, OBJECT, CNNTagger, Tagger, lse_pool
from linearsr.trainer.tagger_fit import (
    DEGRADATION_TAGS,
    FitConfig,
    crop_features,
    degradation_crops,
    degraded_features,
    fit_head,
    out_of_fold,
    precision_thresholds,
    tag_report,
)

log = logging.getLogger(__name__)


def load_photos(shards: str, split: str) -> list[tuple[torch.Tensor, list[str]]]:
    """Every photo of a split as (HR [3, H, W] uint8, its tags), decoded once."""
    stats = Stats()
    out = []
    for sample in iter_samples(shards, split, stats=stats):
        decoded = decode(sample, stats, max_tags=64)
        if decoded is not None:
            out.append((torch.from_numpy(decoded[0].copy()).permute(2, 0, 1).contiguous(), decoded[1]))
    if stats.skips:
        log.warning("tagger: %s samples of the %s split skipped: %s", sum(stats.skips.values()), split, dict(stats.skips))
    return out


def labels_of(tag_lists: list[list[str]], vocab: list[str]) -> torch.Tensor:
    """Multi-hot [N, V]; tags outside the vocabulary are ignored."""
    index = {t: i for i, t in enumerate(vocab)}
    y = torch.zeros(len(tag_lists), len(vocab))
    for n, tags in enumerate(tag_lists):
        for t in tags:
            if t in index:
                y[n, index[t]] = 1.0
    return y


def new_tagger(vocab: list[str], cfg: FitConfig, weights: str | None = None, kinds: list[str] | None = None) -> Tagger:
    """A tagger whose backbone holds the ImageNet AlexNet convs (`make weights` writes them)."""
    from safetensors.torch import load_file

    from linearsr.trainer.quality import lpips_weights_path

    path = lpips_weights_path(weights)
    if not Path(path).is_file():
        raise FileNotFoundError(f"the tagger's ImageNet AlexNet weights are not at {path}; run `make weights`")
    tagger = Tagger(vocab, kinds, crop=cfg.crop, upsample=cfg.scale, pool_r=cfg.pool_r)
    state = load_file(path)
    tagger.backbone.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    return tagger


def split_photos(shards: str, cfg: FitConfig):
    train, val = load_photos(shards, "train"), load_photos(shards, "val")
    if not train:
        raise ValueError(f"the shards at {shards} have no readable train photos")
    if not val:
        raise ValueError(f"the shards at {shards} have no val photos to score the tagger on; rebuild with --val-fraction > 0")
    counts = Counter(t for _, tags in train for t in set(tags))
    vocab = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= cfg.min_count]
    if not vocab:
        raise ValueError(f"no tag is on {cfg.min_count} or more train photos of {shards}; nothing to learn")
    return train, val, vocab


def whole_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    return bicubic_down(modcrop(hr.float() / 255, scale), scale)


@torch.no_grad()
def val_logits(tagger: Tagger, val: list) -> torch.Tensor:
    """[N, V] pooled logits of the val photos, through the path `linearsr upscale` takes (the
    tagger upsamples its LR by the SR scale it was trained for)."""
    return torch.stack([tagger.image_logits(whole_lr(hr, tagger.upsample)) for hr, _ in val])


def fit_tagger(train: list, vocab: list[str], cfg: FitConfig, weights: str | None = None) -> tuple[Tagger, dict]:
    """The tagger fitted on all train photos, its thresholds chosen out of fold; and the
    out-of-fold reports (object tags per photo; degradation tags per crop)."""
    deg_tags = list(DEGRADATION_TAGS) if cfg.degraded_crops else []
    tagger = new_tagger(vocab + deg_tags, cfg, weights, [OBJECT] * len(vocab) + [DEGRADATION] * len(deg_tags))
    hrs = [hr for hr, _ in train]
    feats, y = crop_features(tagger, hrs, cfg), labels_of([tags for _, tags in train], vocab)
    deg = degraded_features(tagger, hrs, cfg, seed=cfg.seed + 1) if deg_tags else None

    def fit(idx):
        fit_head(tagger, feats[idx], y[idx], cfg, (deg[0][idx], deg[1][idx]) if deg else None)
        return {k: v.clone() for k, v in tagger.state_dict().items() if not k.startswith("backbone.")}

    def score(state, idx):
        tagger.load_state_dict(state, strict=False)
        out = []
        with torch.no_grad():
            for i in idx:
                d_feats, d_labels = degradation_crops(feats[i:i + 1], (deg[0][i:i + 1], deg[1][i:i + 1])) if deg else (None, None)
                out.append((lse_pool(tagger.head_logits(feats[i])[:, :len(vocab)], cfg.pool_r),
                            (tagger.head_logits(d_feats)[:, len(vocab):], d_labels) if deg else None))
        return out

    oof = out_of_fold(len(train), cfg, fit, score)
    obj = torch.stack([o for o, _ in oof])
    thresholds = precision_thresholds(obj, y, cfg.precision, cfg.min_hits)
    report = {"cv": tag_report(vocab, obj, y, thresholds)}
    if deg:
        d_scores, d_labels = torch.cat([d[0] for _, d in oof]), torch.cat([d[1] for _, d in oof])
        d_thresholds = precision_thresholds(d_scores, d_labels, cfg.degradation_precision, cfg.min_hits)
        report["degradation_cv"] = tag_report(deg_tags, d_scores, d_labels, d_thresholds)
        thresholds += d_thresholds
    fit_head(tagger, feats, y, cfg, deg)
    tagger.thresholds.copy_(torch.tensor(thresholds))
    return tagger.eval(), report


def fit_cnn(train: list, vocab: list[str], cfg: FitConfig, batch_size: int = 16, lr: float = 2e-3) -> CNNTagger:
    """The baseline as it was trained before: random views (0.5..1 of each side, flipped) of the whole LR photos."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    net = CNNTagger(len(vocab))
    images = [whole_lr(hr, cfg.scale) for hr, _ in train]
    y = labels_of([tags for _, tags in train], vocab)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=cfg.baseline_steps, pct_start=0.1)
    size = net.image_size
    for _ in range(cfg.baseline_steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g).tolist()
        views = []
        for i in idx:
            h, w = images[i].shape[1:]
            ch, cw = (int(s * (0.5 + 0.5 * float(torch.rand((), generator=g)))) for s in (h, w))
            top, left = int(torch.randint(0, h - ch + 1, (), generator=g)), int(torch.randint(0, w - cw + 1, (), generator=g))
            v = images[i][:, top:top + ch, left:left + cw]
            v = v.flip(-1) if torch.rand((), generator=g) < 0.5 else v
            views.append(F.interpolate(v[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
        loss = F.binary_cross_entropy_with_logits(net(torch.stack(views)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def cnn_baseline(train: list, val: list, vocab: list[str], cfg: FitConfig) -> dict:
    """The CNN fitted and scored like the tagger: thresholds out of fold, then val."""
    y = labels_of([tags for _, tags in train], vocab)

    def score(net, idx):
        with torch.no_grad():
            return torch.cat([net(whole_lr(train[i][0], cfg.scale)[None]) for i in idx])

    oof = torch.stack(out_of_fold(len(train), cfg, lambda idx: fit_cnn([train[i] for i in idx], vocab, cfg), score))
    thresholds = precision_thresholds(oof, y, cfg.precision, cfg.min_hits)
    net = fit_cnn(train, vocab, cfg)
    with torch.no_grad():
        val_scores = torch.cat([net(whole_lr(hr, cfg.scale)[None]) for hr, _ in val])
    return {"cv": tag_report(vocab, oof, y, thresholds),
            "val": tag_report(vocab, val_scores, labels_of([t for _, t in val], vocab), thresholds)}


def evaluate_tagger(tagger: Tagger, val: list, cfg: FitConfig) -> dict:
    """The val photos: object tags per photo (windows pooled, as upscale does); degradation tags
    per crop, on bicubic crops and crops through the realistic degradation (seeds no training used)."""
    obj = [i for i, k in enumerate(tagger.kinds) if k == OBJECT]
    deg = [i for i, k in enumerate(tagger.kinds) if k == DEGRADATION]
    names, th = tagger.vocab, tagger.thresholds.tolist()
    report = {"val": tag_report([names[i] for i in obj], val_logits(tagger, val)[:, obj],
                                labels_of([t for _, t in val], [names[i] for i in obj]), [th[i] for i in obj])}
    if deg:
        hrs = [hr for hr, _ in val]
        seed = cfg.seed + 2
        d_feats, d_labels = degradation_crops(crop_features(tagger, hrs, replace(cfg, seed=seed)),
                                              degraded_features(tagger, hrs, cfg, seed=seed + 1))
        with torch.no_grad():
            scores = tagger.head_logits(d_feats)[:, deg]
        report["degradation_val"] = tag_report([names[i] for i in deg], scores, d_labels, [th[i] for i in deg])
    return report


def train_tagger(shards: str, cfg: FitConfig = FitConfig(), baseline: bool = False,
                 weights: str | None = None) -> tuple[Tagger, dict]:
    """Fit the tagger on the train photos of `shards`; score it (and the CNN baseline) on the val photos."""
    start = time.perf_counter()
    train, val, vocab = split_photos(shards, cfg)
    tagger, cv = fit_tagger(train, vocab, cfg, weights)
    report = {"tagger": {**cv, **evaluate_tagger(tagger, val, cfg)}, "train_photos": len(train),
              "val_photos": len(val), "vocab": vocab, "precision_target": cfg.precision,
              "degradation_precision_target": cfg.degradation_precision}
    report["seconds"] = time.perf_counter() - start
    if baseline:
        report["cnn"] = cnn_baseline(train, val, vocab, cfg)
    tagger.meta = {"precision_target": cfg.precision, "degradation_precision_target": cfg.degradation_precision,
                   "trained_on": shards, "held_out": report["tagger"]}
    return tagger, report


def add_to_bundle(tagger: Tagger, bundle_dir: str) -> Path:
    """Write the tagger into a bundle and point its manifest at it (manifest rewritten atomically)."""
    manifest = read_bundle_manifest(bundle_dir)
    weights = tagger.save(Path(bundle_dir) / "tagger")
    write_bundle(bundle_dir, manifest["experts"], manifest["model"], manifest.get("knee_step"), tagger=weights.name)
    return weights


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None or x != x else format(x, spec)


def render(report: dict) -> str:
    """The per-tag table (val photos; out-of-fold train photos) and the summary lines."""
    models = [m for m in ("tagger", "cnn") if m in report]
    lines = [f"held-out tags: {report['val_photos']} val photos (never seen) and {report['train_photos']} train photos "
             f"out of fold; a tag is on where its out-of-fold precision reached {report['precision_target']}", ""]
    head = "| tag | val support |" + "".join(f" {m} on | {m} val P / R | {m} val AUC | {m} cv P / R |" for m in models)
    lines += [head, "|---" * (2 + 4 * len(models)) + "|"]
    for tag in report["vocab"]:
        cells = [tag, str(report["tagger"]["val"]["per_tag"][tag]["support"])]
        for m in models:
            v = report[m]["val"]["per_tag"][tag]
            c = report[m]["cv"]["per_tag"][tag] if report[m].get("cv") else {"precision": None, "recall": None}
            cells += ["yes" if v["on"] else "no", f"{_fmt(v['precision'])} / {_fmt(v['recall'])}", _fmt(v["auc"]),
                      f"{_fmt(c['precision'])} / {_fmt(c['recall'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    t = report["tagger"]
    if "degradation_val" in t:
        v, c = t["degradation_val"], t.get("degradation_cv")
        lines += ["", f"degradation tags, per crop ({v['items']} val-photo crops, bicubic and through the realistic degradation; "
                      f"on where the out-of-fold precision reached {report.get('degradation_precision_target')}):",
                  "", "| tag | crops with it | on | val P / R | val accuracy | val AUC | cv P / R |", "|---" * 7 + "|"]
        for tag, r in v["per_tag"].items():
            cv = c["per_tag"][tag] if c else {"precision": None, "recall": None}
            lines.append(f"| {tag} | {r['support']} | {'yes' if r['on'] else 'no'} | {_fmt(r['precision'])} / "
                         f"{_fmt(r['recall'])} | {_fmt(r['accuracy'])} | {_fmt(r['auc'])} | {_fmt(cv['precision'])} / "
                         f"{_fmt(cv['recall'])} |")
        accuracy = sum(r["accuracy"] for r in v["per_tag"].values()) / len(v["per_tag"])
        lines += ["", f"degradation tags on val crops: mean accuracy {accuracy:.3f}, mean AUC {_fmt(v['mean_auc'], '.3f')}, "
                      f"precision {_fmt(v['precision'])}, recall {_fmt(v['recall'])}"]
    lines.append("")
    for m in models:
        for part in ("val", "cv"):
            r = report[m].get(part)
            if r is None:
                continue
            lines.append(f"{m:6s} {part:3s}: mean AUC {_fmt(r['mean_auc'], '.3f')} over {r['tags_scored']} tags; emitted tags: "
                         f"precision {_fmt(r['precision'])}, recall {_fmt(r['recall'])}; {r['tags_on']} of "
                         f"{len(report['vocab'])} tags on")
    return "\n".join(lines)


def bench(tagger: Tagger, rounds: int = 20, batch_size: int = 8, crop: int = 96) -> dict:
    """Seconds per call of the tagger on a training batch of LR crops against one training step of
    the cpu_tiny model on the same batch, interleaved in this process (the cost tags.source=tagger adds)."""
    from linearsr.model.config import ModelConfig
    from linearsr.model.network import LinearSR

    model = LinearSR(ModelConfig.preset("cpu_tiny", tag_set=tuple(tagger.emitted)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    hr = torch.rand(batch_size, 3, crop, crop)
    lr = bicubic_down(hr, model.cfg.scale)
    times = {"tagger": [], "train_step": []}
    for i in range(rounds + 2):  # the first two warm up
        t0 = time.perf_counter()
        tags = tagger.tag_crops(lr, model.cfg.max_tags)
        t1 = time.perf_counter()
        loss = model.loss(hr, lr, tags, torch.rand(batch_size)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times["tagger"].append(t1 - t0)
            times["train_step"].append(time.perf_counter() - t1)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {**med, "ratio": med["tagger"] / med["train_step"], "threads": torch.get_num_threads(), "batch": batch_size}
