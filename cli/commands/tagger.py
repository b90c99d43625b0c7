"""`linearsr tagger train|eval|bench`: the command over linearsr.trainer.tagger."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from linearsr.model.bundle import read_manifest as read_bundle_manifest
from linearsr.model.tagger import OBJECT, Tagger
from linearsr.trainer.tagger import (
    _fmt,
    add_to_bundle,
    bench,
    cnn_baseline,
    evaluate_tagger,
    render,
    split_photos,
    train_tagger,
)
from linearsr.trainer.tagger_fit import (
    FitConfig,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["train", "eval", "bench"],
                        help="train: fit and write a tagger; eval: score one; bench: its cost beside a training step")
    parser.add_argument("--shards", help="train, eval: shard root URL (folder or s3://…) with tags in its samples")
    parser.add_argument("--out", help="train: output prefix (writes PREFIX.safetensors + PREFIX.json)")
    parser.add_argument("--bundle", help="train: write the tagger into this bundle folder and update its manifest")
    parser.add_argument("--tagger", help="eval, bench: the tagger .safetensors to score or time")
    parser.add_argument("--precision", type=float, default=FitConfig.precision,
                        help=f"held-out precision an object tag must reach to be emitted (default {FitConfig.precision}; "
                             "the photo tags are incomplete, so this is a lower bound)")
    parser.add_argument("--degradation-precision", type=float, default=FitConfig.degradation_precision,
                        help=f"the same for the degradation tags, whose labels are exact (default {FitConfig.degradation_precision})")
    parser.add_argument("--crops-per-photo", type=int, default=FitConfig.crops_per_photo,
                        help=f"random training crops per photo (default {FitConfig.crops_per_photo})")
    parser.add_argument("--degraded-crops", type=int, default=FitConfig.degraded_crops,
                        help=f"crops per photo through the realistic degradation, for the degradation tags (default "
                             f"{FitConfig.degraded_crops}; 0 = no degradation tags)")
    parser.add_argument("--steps", type=int, default=FitConfig.steps, help=f"head training steps (default {FitConfig.steps})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="do not fit and score the CNN baseline")
    parser.add_argument("--json", help="also write the report as JSON to this file")


def run(args: argparse.Namespace) -> int:
    if args.action == "bench":
        if not args.tagger:
            raise ValueError("say which tagger to time: --tagger FILE.safetensors")
        r = bench(Tagger.load(args.tagger))
        print(f"tagger on {r['batch']} LR crops: {1000 * r['tagger']:.1f} ms; cpu_tiny training step on the same batch: "
              f"{1000 * r['train_step']:.1f} ms; ratio {r['ratio']:.2f} (medians, {r['threads']} threads, interleaved)")
        return 0
    if not args.shards:
        raise ValueError(f"tagger {args.action} needs --shards (the shard root with the photo tags)")
    cfg = FitConfig(precision=args.precision, degradation_precision=args.degradation_precision, seed=args.seed,
                    crops_per_photo=args.crops_per_photo, steps=args.steps, degraded_crops=args.degraded_crops)
    if args.action == "train":
        if not args.out and not args.bundle:
            raise ValueError("say where the tagger goes: --out PREFIX or --bundle DIR")
        if args.bundle:
            read_bundle_manifest(args.bundle)  # fail before training when the bundle is not there
        tagger, report = train_tagger(args.shards, cfg, baseline=not args.no_baseline)
        paths = ([tagger.save(args.out)] if args.out else []) + ([add_to_bundle(tagger, args.bundle)] if args.bundle else [])
        where = ", ".join(map(str, paths))
    else:
        if not args.tagger:
            raise ValueError("say which tagger to score: --tagger FILE.safetensors")
        tagger = Tagger.load(args.tagger)
        train, val, _ = split_photos(args.shards, cfg)
        trained = tagger.meta.get("held_out", {})
        vocab = [t for t, k in zip(tagger.vocab, tagger.kinds) if k == OBJECT]
        report = {"tagger": {**{k: v for k, v in trained.items() if k.endswith("cv")}, **evaluate_tagger(tagger, val, cfg)},
                  "train_photos": len(train), "val_photos": len(val), "vocab": vocab,
                  "precision_target": tagger.meta.get("precision_target"),
                  "degradation_precision_target": tagger.meta.get("degradation_precision_target")}
        if not args.no_baseline:
            report["cnn"] = cnn_baseline(train, val, vocab, cfg)
        where = args.tagger
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    val = report["tagger"]["val"]
    print(f"tagger: {where} ({len(tagger.emitted)} of {len(tagger.vocab)} tags on; val mean AUC {_fmt(val['mean_auc'], '.3f')}"
          + (f" vs CNN {_fmt(report['cnn']['val']['mean_auc'], '.3f')}" if "cnn" in report else "") + ")")
    return 0
