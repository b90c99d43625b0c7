"""`linearsr shards build SRC DEST`: WebDataset shards from a folder of images (local or any fsspec URL).

S3 destinations use AWS_ENDPOINT_URL and the usual AWS credentials from the environment."""

from __future__ import annotations

import argparse
import json

from linearsr.data.shards import build_shards, read_shard_manifest, verify_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build train/val shards and manifest.json from an image folder")
    b.add_argument("src", help="folder (recursive) or fsspec URL of images: jpg, png, webp, bmp, tif")
    b.add_argument("dest", help="shard root: a local folder or s3://bucket/prefix")
    b.add_argument("--samples-per-shard", type=int, default=64, help="samples per .tar (default 64)")
    b.add_argument("--val-fraction", type=float, default=0.1, help="fraction of images for validation, chosen by key hash (default 0.1)")
    b.add_argument("--max-side", type=int, default=None, help="down-scale images whose longest side is larger (stored as PNG)")
    b.add_argument("--tags", default=None, help="JSON file {image name: [tags]} (name = relative path, file name or stem)")
    b.add_argument("--seed", type=int, default=0, help="orders the samples inside the splits (not the split itself)")
    b.add_argument("--lr", default=None, metavar="DIR",
                   help="folder of real LR images named like the HR ones (any extension): stored as KEY.lr.png beside each HR")
    b.add_argument("--scale", type=int, default=None, help="with --lr: the HR/LR scale every pair must have (default: the first pair's)")
    b.add_argument("--allow-unpaired", action="store_true",
                   help="with --lr: keep HR images without an LR partner (their LR is synthesised in training) instead of skipping them")
    b.add_argument("--overwrite", action="store_true", help="replace shards already in DEST")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="print a shard root's manifest summary")
    i.add_argument("root", help="shard root (folder or s3://bucket/prefix)")
    v = sub.add_parser("verify", help="read every shard and check it against manifest.json (size, sha256, samples)")
    v.add_argument("root", help="shard root (folder or s3://bucket/prefix)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.action == "verify":
        return _verify(args)
    if args.action == "build":
        m = build_shards(args.src, args.dest, samples_per_shard=args.samples_per_shard, val_fraction=args.val_fraction,
                         max_side=args.max_side, tags=args.tags, seed=args.seed, overwrite=args.overwrite,
                         progress=not args.no_progress, lr=args.lr, scale=args.scale, allow_unpaired=args.allow_unpaired)
    else:
        m = read_shard_manifest(args.root)
    summary = {s: {k: v.get(k, 0) for k in ("samples", "paired", "bytes")} | {"shards": len(v["shards"])}
               for s, v in m["splits"].items()}
    print(json.dumps({"splits": summary, "tags": len(m["tags"]), "skipped": [x["source"] for x in m["skipped"]]}))
    for x in m["skipped"]:
        print(f"skipped {x['source']}: {x['error']}")
    if m["settings"].get("lr_scale"):
        print(f"real LR/HR pairs at x{m['settings']['lr_scale']}: {sum(v.get('paired', 0) for v in m['splits'].values())} "
              f"of {sum(v['samples'] for v in m['splits'].values())} samples")
    return 0


def _verify(args: argparse.Namespace) -> int:
    r = verify_shards(args.root, progress=not args.no_progress)
    for p in r["problems"]:
        print(f"{p['path']}: {p['problem']}")
    if r["problems"]:
        print(f"{len(r['problems'])} of {r['shards']} shards under {args.root} do not match manifest.json: rebuild with "
              f"`linearsr shards build SRC {args.root} --overwrite` (or copy the damaged ones again)")
        return 1
    print(f"ok: {r['shards']} shards, {r['samples']} samples, {r['bytes']} bytes under {args.root} match manifest.json")
    return 0
