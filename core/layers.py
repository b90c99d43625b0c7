"""The package's layers, lowest first: a module may import its own layer's package and the layers
below it, never one above, and the packages of one layer never import each other
(tests/unit/core/test_layers.py checks every import, including those inside functions).

    linearsr (main)       the `linearsr` command: parses the command name, imports one command
    bench                 the benchmarks (`linearsr bench`, `make bench*`): never shipped with a job
    dev                   demo and test scaffolding (photos, devset, local S3, local Ray head): never shipped
    commands              one module per subcommand: argparse, printing, exit codes
    ckpt_analysis         the ESGF sidecar: knee, tree, expert jobs
    cluster               Ray Train launch, Ray Jobs
    trainer               the training loop, checkpoints, evaluation, export
    model, data           the network and sampler; shards, degradations, loaders (independent)
    core                  storage, code id, small shared helpers

`SHIPPED` is what a Ray job receives (cluster/jobs.py via core.codeid.package_files): the
library and its commands, not the scaffolding."""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("model", "data"),
    ("trainer",),
    ("cluster",),
    ("ckpt_analysis",),
    ("commands",),
    ("dev",),
    ("bench",),
    ("main",),  # the top package's own modules: linearsr/__init__, __main__, main
)
SHIPPED: tuple[str, ...] = ("core", "model", "data", "trainer", "cluster", "ckpt_analysis", "commands")


def layer_of(module: str) -> int:
    """linearsr.<package>.x -> the index of its layer; the top package's own modules -> the last."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "main"
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    return len(LAYERS) - 1
