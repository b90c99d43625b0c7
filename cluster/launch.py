"""Start (or attach to) Ray and run one training as a Ray Train `TorchTrainer`.

    result = train(cfg)        # cfg: linearsr.trainer.config.TrainConfig

Ray: attaches to `cluster.address`, else RAY_ADDRESS (what a Ray Job's entrypoint gets), else
starts a local Ray in this process. Storage: Ray Train's experiment folder is RUN/checkpoints
(`storage_path` = the run URL, `name` = "checkpoints"); an s3:// run goes through an s3fs
filesystem honouring AWS_ENDPOINT_URL. Resume is decided by the workers from the COMPLETE
markers in RUN/checkpoints (see linearsr.trainer.checkpoint), so Ray's own bookkeeping snapshot
of an earlier fit is removed before a new one starts."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from linearsr.cluster.jobs import FORWARD_ENV
from linearsr.core import storage
from linearsr.trainer import rundir
from linearsr.trainer.config import TrainConfig, config_text

log = logging.getLogger(__name__)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # explicit: Ray 2.60 turns token auth on by itself
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class TrainResult:
    run_url: str
    step: int
    val_loss: float | None
    checkpoint: str | None
    seconds: float


def absolute_run_url(url: str) -> str:
    """A local path made absolute (workers have another cwd); other URLs as they are."""
    return os.path.abspath(storage.local_path(url)) if storage.is_local(url) else url.rstrip("/")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths of the config made absolute: the workers run in Ray's session folder."""
    return cfg.replace(run={"url": absolute_run_url(cfg.run_url)}, data={"shards": absolute_run_url(cfg.data.shards)},
                       finetune={"init": cfg.finetune.init and absolute_run_url(cfg.finetune.init)},
                       faults={"die_once_marker": cfg.faults.die_once_marker and os.path.abspath(cfg.faults.die_once_marker)})


def _reachable(address: str, timeout: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def check_address(address: str) -> str:
    """The Ray address to attach to ("" = start a local Ray); a one-line error when it cannot work."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        raise ValueError(f"Ray address {address} is a Jobs API (dashboard) URL; submit with "
                         f"`linearsr submit --address {address} ...`, or give the cluster's GCS address host:port")
    if address and address != "auto" and not address.startswith("ray://") and not _reachable(address):
        raise ConnectionError(f"cannot reach the Ray cluster at {address} (cluster.address / RAY_ADDRESS): start it "
                              "(`make ray-up`, `ray start --head`) or unset RAY_ADDRESS to train on a local Ray")
    return address


def connect(address: str = "") -> str:
    """Attach to `address` / RAY_ADDRESS, or start a local Ray. Returns what was used."""
    import ray

    if ray.is_initialized():
        return "this process's Ray"
    address = check_address(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
            return address
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1")
    except ConnectionError as e:
        raise ConnectionError(f"cannot connect to Ray at {address or 'a new local instance'}: {e}") from None
    return "a new local Ray"


def process_group_backend(use_gpu: bool) -> str:
    """GPU runs get both backends: NCCL for CUDA tensors (DeepSpeed's collectives), gloo for
    anything that still lands on the CPU, so no collective fails on a tensor's device."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def storage_for(run_url: str):
    """(storage_path, storage_filesystem) for RunConfig: RUN itself (Ray adds /checkpoints)."""
    if storage.is_local(run_url):
        return run_url, None
    if not run_url.startswith("s3://"):
        return run_url, None  # pyarrow resolves gs://, hdfs://, ...
    import pyarrow.fs
    import s3fs

    # Ray's own writes (its bookkeeping snapshot) get the same botocore retries as ours
    fs = s3fs.S3FileSystem(**storage.s3_options())
    return run_url[len("s3://"):], pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def prepare_run_dir(cfg: TrainConfig, run_url: str) -> None:
    """Check the inputs and write RUN/config.json before any worker starts, so a bad shard root,
    bucket or init checkpoint is a one-line error instead of a failed Ray job."""
    from linearsr.data.shards import read_shard_manifest
    from linearsr.trainer import checkpoint as ckpt

    read_shard_manifest(cfg.data.shards, cfg.data.s3_endpoint)
    if cfg.finetune.init:
        ckpt.require_complete(cfg.finetune.init)
    try:
        storage.write_text_atomic(storage.join(run_url, "config.json"), config_text(cfg) + "\n")
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot write the run dir {run_url}: its bucket or parent does not exist") from None
    storage.rm(storage.join(run_url, "checkpoints", SNAPSHOT))


def train(cfg: TrainConfig) -> TrainResult:
    """Run the training to cfg.run.steps (resuming RUN if it has checkpoints)."""
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from linearsr.trainer.loop import train_loop_per_worker

    cfg = absolute_paths(cfg)
    run_url = cfg.run_url
    storage.configure(cfg.storage)
    check_address(cfg.cluster.address)  # before anything is written
    prepare_run_dir(cfg, run_url)
    where = connect(cfg.cluster.address)
    log.info("training %s on %s: %d workers x %g CPU%s, ZeRO-%d %s", run_url, where, cfg.cluster.num_workers,
             cfg.cluster.cpus_per_worker, " + 1 GPU" if cfg.cluster.use_gpu else "", cfg.deepspeed.zero_stage,
             cfg.deepspeed.precision)
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if cfg.cluster.use_gpu else "cpu"
    storage_path, storage_fs = storage_for(run_url)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_url": run_url},
        torch_config=TorchConfig(backend=process_group_backend(cfg.cluster.use_gpu)),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(
            name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"training of {run_url} failed (cluster.max_failures={cfg.cluster.max_failures} restarts "
                           f"allowed): {_root_cause(e)}") from None
    records = rundir.read_metrics(run_url)
    last = records[-1] if records else {}
    return TrainResult(run_url, int(last.get("step", 0)), last.get("val_loss"),
                       _last_checkpoint(records), time.perf_counter() - t0)


def _last_checkpoint(records: list[dict]) -> str | None:
    for r in reversed(records):
        if r.get("checkpoint"):
            return r["checkpoint"]
    return None


_FALLOUT = ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")


def _innermost(e: BaseException) -> BaseException:
    seen = set()
    while True:
        nxt = getattr(e, "controller_failure", None) or getattr(e, "cause", None) or e.__cause__
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return f"{type(e).__name__}: {text if len(text) <= 300 else text[:300] + ' ...'}"


def _root_cause(e: BaseException) -> str:
    """One line: the failing worker's innermost error, preferring the rank that failed first over
    the ranks whose collectives broke because of it (a worker's ValueError reads as what it says)."""
    failures = getattr(e, "worker_failures", None)
    if not failures:
        return _one_line(_innermost(e))
    causes = {rank: _innermost(err) for rank, err in sorted(failures.items())}
    primary = [r for r, c in causes.items() if not any(m in str(c) for m in _FALLOUT)] or list(causes)
    rank = primary[0]
    return f"rank {rank}: {_one_line(causes[rank])}"
