"""`linearsr submit`: run `linearsr train` as a Ray Job on a cluster.

    linearsr submit --address http://HEAD:8265 --config configs/base_x4.toml --run s3://bucket/runs/x4

The config is resolved here (file + overrides + flags, checked; the shard root and --init
checkpoint must be readable from here too), written to RUN/config.json, and
the job runs `python -m linearsr train --config RUN/config.json --run RUN`: the cluster reads exactly
what was checked, whatever its working directory, with the code that checked it (the job carries
this process's linearsr package, see cluster/jobs.py). Its runtime env also carries the
non-secret environment the trainer needs
(S3 endpoint and region, Ray/DeepSpeed switches, plus `--env NAME`). Credentials are not
forwarded unless named with --env, and values are never printed; forwarding one prints a
warning, because Ray itself records a job's environment and logs it on the head."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from linearsr.cluster.jobs import FORWARD_ENV
from linearsr.cluster.launch import absolute_paths, prepare_run_dir
from linearsr.commands.train import add_config_arguments, resolve
from linearsr.core import storage

_SECRET = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--address", help="the cluster's Jobs API URL (http://HEAD:8265); default RAY_ADDRESS, "
                                          "then the head of `make ray-up`")
    parser.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="also forward this environment variable to the job (its value is never printed)")
    parser.add_argument("--submission-id", help="Ray submission id (default train-<run name>-<time>)")
    parser.add_argument("--num-cpus", type=float, default=0.0, help="CPUs reserved for the job's driver (default 0)")


def run(args: argparse.Namespace) -> int:
    from linearsr.cluster.jobs import Jobs, command
    from linearsr.core.codeid import code_id

    cfg = absolute_paths(resolve(args))  # no cluster.address: the job attaches to the cluster it runs on
    run_url = cfg.run_url
    missing = [n for n in args.env if n not in os.environ]
    if missing:
        raise ValueError(f"--env {missing[0]} is not set in this environment")
    secret = [n for n in args.env if _SECRET.search(n)]
    if secret:
        print(f"linearsr submit: warning: --env {', '.join(secret)}: Ray keeps a job's environment in its job record "
              "(dashboard) and logs it on the head (runtime_env_agent.log); prefer credentials the cluster nodes "
              "have themselves (instance role, AWS_PROFILE, or the environment `ray start` runs in)", file=sys.stderr)
    jobs = Jobs(args.address)  # fails here, before anything is written, when the cluster is unreachable
    prepare_run_dir(cfg, run_url)  # shard root, --init and run dir checked here (not in the job); config.json written
    config_url = storage.join(run_url, "config.json")
    env = {n: os.environ[n] for n in (*FORWARD_ENV, *args.env) if n in os.environ}
    sid = args.submission_id or f"train-{re.sub(r'[^A-Za-z0-9_.-]+', '-', cfg.run.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    entrypoint = command("train", "--config", config_url, "--run", run_url)
    jobs.submit(sid, entrypoint, num_cpus=args.num_cpus or None, env_vars=env)
    shown = ", ".join(f"{n}=***" if _SECRET.search(n) else n for n in sorted(env)) or "none"
    print(f"submitted Ray job {sid} to {jobs.address}: {entrypoint}")
    print(f"  code: linearsr {code_id()} (shipped with the job; its log and TensorBoard show the same id)")
    print(f"  forwarded environment: {shown}")
    print(f"  follow it with: ray job logs -f --address {jobs.address} {sid}")
    return 0
