"""The `linearsr` command. Each subcommand is a module of linearsr.commands (linearsr.dev for the
demo, linearsr.bench for the benchmarks) over the functions of a stage package, imported
only when used, so `linearsr upscale` does not pay for importing Ray or DeepSpeed.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("linearsr.dev.demo", "the whole pipeline on this machine: data, pretrain, knee, experts, tagger, eval"),
    "shards": ("linearsr.commands.shards", "build WebDataset shards from an image folder (local or s3://)"),
    "train": ("linearsr.commands.train", "pretrain or fine-tune on a local or attached Ray cluster"),
    "submit": ("linearsr.commands.submit", "submit a training run as a Ray Job to a cluster"),
    "export": ("linearsr.commands.export", "consolidate a checkpoint into a 1-expert bundle (safetensors)"),
    "analyze": ("linearsr.commands.analyze", "find the knee checkpoint (one-shot, or --watch as the sidecar)"),
    "experts": ("linearsr.commands.experts", "fine-tune one expert per log-SNR interval and build the bundle"),
    "upscale": ("linearsr.commands.upscale", "upscale images with a bundle"),
    "eval": ("linearsr.commands.evaluate", "evaluate a bundle against bicubic: PSNR, SSIM, LPIPS, pictures"),
    "tagger": ("linearsr.commands.tagger", "train the small TAG tagger on the tags stored in the shards"),
    "calibrate": ("linearsr.commands.calibrate", "measure the residual's scale on the shards, write model.residual_scale into a preset"),
    "bench": ("linearsr.bench", "benchmarks: attention, data, train, gpu"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: linearsr COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `linearsr COMMAND --help` for a command's options."]
    return "\n".join(lines)


def setup_logging(verbose: bool = False) -> None:
    """linearsr's own loggers at INFO (DEBUG with `verbose`), other libraries' at WARNING: their
    INFO lines ("Found credentials in environment variables.") would crowd a one-line error, and
    botocore's DEBUG log prints every request's signed headers, the access key id among them."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("linearsr").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] in ("-v", "--verbose"):  # `linearsr -v CMD ...` = `linearsr CMD -v ...`
        argv = [argv[1], argv[0], *argv[2:]]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from linearsr import __version__
        from linearsr.core.codeid import code_id

        print(f"{__version__} (code {code_id()})")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"linearsr: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"linearsr {name}", description=help_)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    setup_logging(args.verbose)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines print above a progress bar, not glued to its end
            return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as e:
        # user-facing errors are one sentence; internal bugs (asserts, others) keep their traceback
        logging.getLogger("linearsr").debug("error detail", exc_info=True)
        print(f"linearsr {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"linearsr {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
