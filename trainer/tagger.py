"""`linearsr tagger train`: fit the small TAG tagger on the tags stored in the shards.

Every train photo is decoded once and made LR (bicubic); training sees random views of those
LR images (the whole LR image is what the tagger gets at upscale time); the held-out score is measured on the val split, whose photos the tagger never saw:
mean per-tag ROC-AUC (chance = 0.5) and top-1 precision against the prior (always guessing
the most frequent tag). With `--bundle DIR` the tagger is written into the bundle and the
manifest's "tagger" field is set, so `linearsr upscale` uses it when no --tags is given."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import torch.nn.functional as F

from linearsr.data.degrade import bicubic_down, modcrop
from linearsr.data.reader import Stats, decode, iter_samples
from linearsr.data.shards import read_manifest
from linearsr.model.bundle import read_manifest as read_bundle_manifest, write_bundle
from linearsr.model.tagger import Tagger

log = logging.getLogger(__name__)


def shard_tag_counts(shards: str) -> dict[str, int]:
    """How many samples carry each tag, from the shard manifest (no image decoding)."""
    counts = read_manifest(shards).get("tags") or {}
    if not counts:
        raise ValueError(f"the shards at {shards} carry no tags; rebuild them with `linearsr shards build --tags FILE`")
    return counts


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


@torch.no_grad()
def held_out_scores(tagger: Tagger, val_batches, prior_top: str) -> dict:
    logits, targets = [], []
    for batch in val_batches:
        logits.append(tagger(batch["lr"]))
        targets.append(tagger.targets(batch["tags"]))
    if not logits:
        raise ValueError("the val split yielded no samples; rebuild the shards with a larger --val-fraction")
    s, y = torch.cat(logits), torch.cat(targets)
    aucs = [roc_auc(s[:, j], y[:, j]) for j in range(y.shape[1])]
    aucs = [a for a in aucs if a == a]
    top1 = s.argmax(1)
    has_tags = y.sum(1) > 0
    precision = float(y[torch.arange(len(y)), top1][has_tags].mean()) if has_tags.any() else float("nan")
    prior_idx = tagger.index[prior_top]
    prior_precision = float(y[has_tags, prior_idx].mean()) if has_tags.any() else float("nan")
    return {"samples": len(y), "mean_auc": sum(aucs) / len(aucs) if aucs else float("nan"), "tags_scored": len(aucs),
            "top1_precision": precision, "prior_top1_precision": prior_precision}


def load_split(shards: str, split: str, scale: int, max_side: int) -> list[tuple[torch.Tensor, list[str]]]:
    """Every sample of a split as (LR image [3, h, w] in [0, 1], tags): decoded once, bicubic
    x1/scale from the HR (after shrinking the HR to `max_side`), kept in memory (the tagger is small)."""
    stats = Stats()
    out = []
    for sample in iter_samples(shards, split, stats=stats):
        decoded = decode(sample, stats, max_tags=64)
        if decoded is None:
            continue
        hr = torch.from_numpy(decoded[0].copy()).permute(2, 0, 1).float() / 255
        shrink = max(hr.shape[1:]) / max_side
        if shrink > 1:
            hr = F.interpolate(hr[None], scale_factor=1 / shrink, mode="bicubic", antialias=True)[0].clamp(0, 1)
        out.append((bicubic_down(modcrop(hr, scale), scale), decoded[1]))
    if stats.skips:
        log.warning("tagger: %s samples of the %s split skipped: %s", sum(stats.skips.values()), split, dict(stats.skips))
    return out


def random_view(lr: torch.Tensor, g: torch.Generator, min_frac: float = 0.5) -> torch.Tensor:
    """A random crop covering min_frac..1 of each side, randomly flipped."""
    h, w = lr.shape[1:]
    ch = int(h * (min_frac + (1 - min_frac) * torch.rand((), generator=g)))
    cw = int(w * (min_frac + (1 - min_frac) * torch.rand((), generator=g)))
    top = int(torch.randint(0, h - ch + 1, (), generator=g))
    left = int(torch.randint(0, w - cw + 1, (), generator=g))
    view = lr[:, top:top + ch, left:left + cw]
    return view.flip(-1) if torch.rand((), generator=g) < 0.5 else view


def train_tagger(shards: str, steps: int = 400, scale: int = 4, batch_size: int = 16, lr: float = 2e-3,
                 seed: int = 0, min_count: int = 2, max_side: int = 1024) -> tuple[Tagger, dict]:
    """Fit the tagger on the train split's tags; score it on the val split (photos it never saw)."""
    torch.manual_seed(seed)
    counts = shard_tag_counts(shards)
    vocab = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
    if not vocab:
        raise ValueError(f"no tag occurs on at least {min_count} photos in the shards at {shards}; nothing to learn")
    start = time.perf_counter()
    train, val = load_split(shards, "train", scale, max_side), load_split(shards, "val", scale, max_side)
    if not train:
        raise ValueError(f"the shards at {shards} have no readable train samples")
    if not val:
        raise ValueError(f"the shards at {shards} have no val samples to score the tagger on; rebuild with --val-fraction > 0")
    tagger = Tagger(vocab)
    size = tagger.image_size
    opt = torch.optim.AdamW(tagger.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=g).tolist()
        views = [F.interpolate(random_view(train[i][0], g)[None], size=(size, size), mode="bilinear",
                               antialias=True, align_corners=False)[0] for i in idx]
        loss = tagger.loss(torch.stack(views), [train[i][1] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("tagger step %d/%d: loss %.4f", step + 1, steps, sum(losses[-100:]) / len(losses[-100:]))
    tagger.eval()
    val_batches = [{"lr": lr_img[None], "tags": [tags]} for lr_img, tags in val]
    scores = held_out_scores(tagger, val_batches, vocab[0])
    scores.update(vocab_size=len(vocab), steps=steps, train_samples=len(train), train_loss_first=losses[0],
                  train_loss_last=sum(losses[-20:]) / len(losses[-20:]), seconds=time.perf_counter() - start)
    return tagger, scores


def add_to_bundle(tagger: Tagger, bundle_dir: str) -> Path:
    """Write the tagger into a bundle and point its manifest at it (manifest rewritten atomically)."""
    manifest = read_bundle_manifest(bundle_dir)
    weights = tagger.save(Path(bundle_dir) / "tagger")
    write_bundle(bundle_dir, manifest["experts"], manifest["model"], manifest.get("knee_step"), tagger=weights.name)
    return weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["train"], help="train: fit the tagger on the shards' tags")
    parser.add_argument("--shards", required=True, help="shard root URL (folder or s3://…) with tags in its samples")
    parser.add_argument("--out", help="output prefix (writes PREFIX.safetensors + PREFIX.json)")
    parser.add_argument("--bundle", help="write the tagger into this bundle folder and update its manifest")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.bundle:
        raise ValueError("say where the tagger goes: --out PREFIX or --bundle DIR")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.bundle:
        read_bundle_manifest(args.bundle)  # fail before training when the bundle is not there
    tagger, scores = train_tagger(args.shards, args.steps, args.scale, args.batch_size, seed=args.seed)
    paths = []
    if args.out:
        paths.append(tagger.save(args.out))
    if args.bundle:
        paths.append(add_to_bundle(tagger, args.bundle))
    print(json.dumps(scores, indent=2))
    print(f"tagger: {', '.join(map(str, paths))} ({len(tagger.vocab)} tags; held-out mean AUC {scores['mean_auc']:.3f}, "
          f"top-1 precision {scores['top1_precision']:.2f} vs prior {scores['prior_top1_precision']:.2f})")
    return 0
