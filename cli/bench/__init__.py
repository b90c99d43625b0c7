"""`linearsr bench WHAT`: the measurement commands behind `make bench*`.

Each benchmark lives beside the code it measures and prints a table of ratios against a
baseline run in the same process (speed claims come from here, never from tests)."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "attention": ("linearsr.bench.attention", "linear vs softmax attention, fwd+bwd time vs tokens (CPU or GPU)"),
    "data": ("linearsr.bench.data", "degradation, decode and loader throughput per core, and base_x4 supply / demand"),
    "train": ("linearsr.bench.train", "Ray + DeepSpeed steps/s vs a plain torch loop"),
    "gpu": ("linearsr.bench.gpu", "fused/fla/torch/sdpa attention and model latency on a GPU"),
    "infer": ("linearsr.bench.infer", "upscaling: memory and time untiled vs exact-tiled, 1-NFE vs size (linear vs "
                                            "softmax), the latent preset on a GPU"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=sorted(BENCHES), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of that benchmark (see `linearsr bench WHAT --help`)")


def run(args: argparse.Namespace) -> int:
    module_name, help_ = BENCHES[args.what]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"linearsr bench {args.what}", description=help_)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
