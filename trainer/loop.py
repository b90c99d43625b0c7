"""The training loop that runs in every Ray Train worker (one DeepSpeed engine per worker).

    train_loop_per_worker({"config": TrainConfig as dict, "run_url": RUN})

Per optimizer step: grad_accum micro-batches of the flow-matching loss at t drawn from
`cfg.flow.sample_t` (only inside the fine-tune interval when one is set). Every
`validation.every` steps: validation per log-SNR interval, one metrics.jsonl record and
TensorBoard scalars (rank 0); every `checkpoint.every` steps (and at the last step) a checkpoint
through `ray.train.report`. On start the newest complete checkpoint of RUN whose files match their
checksums is resumed exactly (step, samples, weights, optimizer, LR schedule, EMA, every RNG and
the data position: the run continues as if it had not stopped); a checkpoint that fails
verification is marked CORRUPT and the previous one is taken. Otherwise `finetune.init` supplies
the weights (its EMA weights when it has them). With optim.ema_decay > 0 validation reports the
EMA weights (val_loss, val_loss_by_interval: what the sidecar decides on and what ships) and the
raw ones (val_loss_raw, val_loss_raw_by_interval). A fine-tune logs TensorBoard on its init
checkpoint's step axis (global_step = init's global_step + step), so its curves continue the
pretrain's. Collectives run on the engine's device (trainer/collectives.py)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from linearsr.core import storage
from linearsr.core.codeid import code_id
from linearsr.core.util import stable_hash
from linearsr.model.flow import FULL_RANGE
from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer import configlib, rundir, zero
from linearsr.trainer.collectives import all_min, all_sum, broadcast, broadcast_tensors, gather
from linearsr.trainer.config import TrainConfig, config_text
from linearsr.trainer.engine import EMA, build_engine, current_lr, grad_norm, init_distributed

log = logging.getLogger("linearsr.trainer")


def _setup_logging(rank: int) -> None:
    # DeepSpeed 0.19 calls torch collectives that torch 2.13 marks deprecated, once per step
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning)
    logger = logging.getLogger("linearsr")
    if not any(getattr(h, "_linearsr", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._linearsr = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class Trainer:
    """State of one worker's run; methods in the order the loop calls them."""

    def __init__(self, cfg: TrainConfig, run_url: str):
        import ray.train
        import ray.train.torch

        self.cfg, self.run_url = cfg, run_url
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        _setup_logging(self.rank)
        if not cfg.cluster.use_gpu:  # one thread per CPU Ray gave us: more threads spin against each other
            torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
        storage.configure(cfg.storage)
        init_distributed(cfg.cluster.use_gpu)
        self.device = ray.train.torch.get_device()
        self.interval = cfg.interval
        self.step = 0
        self.samples = 0
        self.step_offset = 0  # TensorBoard's step axis starts where the init checkpoint's run was
        self.init_weights: str | None = None  # "ema" | "raw": what a fine-tune started from
        self.retry_base = storage.retry_count()
        self.tmp_dirs: list[str] = []
        self.rank_state: dict | None = None  # this rank's random streams and data position, when resumed

    # ------------------------------------------------------------------ setup

    def build(self) -> None:
        from linearsr.model.network import LinearSR
        from linearsr.trainer.tagsource import open_tag_source

        self.cfg, self.tags = open_tag_source(self.cfg, self.run_url, self.rank, self.device)  # model.tag_set, the run's tagger
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = LinearSR(cfg.model)
        resume = self._resume_point()
        world_changed = resume is not None and resume[2]["world_size"] != self.world
        if cfg.finetune.init:
            init_meta = ckpt.read_meta(cfg.finetune.init)
            self.step_offset = int(init_meta.get("global_step", init_meta["step"]))
            if resume is None:
                self._load_weights(model, cfg.finetune.init, lambda url: self._init_weights(url, init_meta))
        if world_changed:
            self._load_weights(model, resume[0], lambda _url: zero.consolidate(resume[1]))
        self.engine, self.scheduler = build_engine(cfg, model)
        self.model = self.engine.module.model
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.gen = torch.Generator().manual_seed(stable_hash("t", cfg.run.seed, self.rank) >> 1)
        torch.manual_seed(stable_hash("torch", cfg.run.seed, self.rank) >> 1)
        random.seed(stable_hash("python", cfg.run.seed, self.rank))
        np.random.seed(stable_hash("numpy", cfg.run.seed, self.rank) >> 32)
        self.meta = None
        if resume is not None:
            self._load_resume(*resume, world_changed=world_changed)
        self.start_step = self.step
        if self.rank == 0:
            self._open_outputs()
        dist.barrier()

    def _resume_point(self) -> tuple[str, str, dict] | None:
        """(URL, local folder, meta) of the newest complete checkpoint whose files this run can
        read and that match COMPLETE's sizes and checksums on every rank. Each rank fetches only
        the files it needs. One that fails is marked CORRUPT (with why) and the next older is tried."""
        import ray.train

        candidates = None
        if self.rank == 0:
            candidates = [f.url for f in ckpt.complete_newest_first(self.run_url, remove_incomplete=True)]
            ray_ckpt = ray.train.get_checkpoint()
            newest = candidates[0].rsplit("/", 1)[-1] if candidates else None
            if ray_ckpt is not None and not ray_ckpt.path.rstrip("/").endswith(str(newest)):
                log.warning("Ray's latest checkpoint %s is not the newest complete one; using %s instead", ray_ckpt.path,
                            candidates[0] if candidates else "none (fresh start)")
        for url in broadcast(candidates):
            meta = ckpt.read_meta(url)
            same_world = meta["world_size"] == self.world
            local, problems = ckpt.fetch(url, self._tmp("linearsr-resume-"),
                                         keep=lambda rel: zero.rank_needs(rel, self.rank, same_world))
            bad = [f"rank {r}: {p}" for r, ps in enumerate(gather(problems)) for p in ps]
            if not bad:
                log.info("resuming from %s%s", url, "" if same_world else
                         f" (saved by {meta['world_size']} workers, now {self.world}: see docs/operations.md, resume)")
                return url, local, meta
            if self.rank == 0:
                log.error("checkpoint %s does not match its %s list (%s); marking it %s and taking the one before",
                          url, ckpt.MARKER, "; ".join(bad[:3]), ckpt.CORRUPT)
                ckpt.mark_corrupt(url, "; ".join(bad[:5]))
            dist.barrier()
        return None

    def _init_weights(self, init_url: str, meta: dict) -> dict[str, torch.Tensor]:
        """Rank 0's view of a fine-tune start: the --init checkpoint's weights (its EMA ones when it
        has them), from a checkpoint of any ZeRO stage / world size."""
        from linearsr.model.config import ModelConfig

        ckpt.require_complete(init_url)
        theirs = ModelConfig.from_dict(meta["config"]["model"])
        if theirs != self.cfg.model:
            raise ValueError(f"--init checkpoint {init_url} has another model config: {'; '.join(theirs.diff(self.cfg.model))}")
        state, self.init_weights = zero.load_weights(init_url, self._tmp("linearsr-init-"))
        ckpt.pin(init_url, by=self.run_url, why="the --init of this fine-tune")
        return state

    def _load_weights(self, model, url: str, read) -> None:
        """Weights only: rank 0 reads them once (`read(url)`), every other rank gets them by broadcast."""
        if self.rank == 0:
            model.load_state_dict(read(url))
        broadcast_tensors(model.state_dict(), self.device)
        self.init_weights = broadcast(self.init_weights)
        log.info("weights from %s (%s); optimizer and its moments start fresh", url, self.init_weights or "raw")

    def _load_resume(self, url: str, local: str, meta: dict, world_changed: bool) -> None:
        self.meta = meta
        self.step, self.samples = int(meta["step"]), int(meta["samples"])
        self.init_weights = meta.get("init_weights")
        if world_changed:  # weights came consolidated; the schedule follows the step
            self.scheduler.last_epoch = self.step - 1
            self.scheduler.step()
        else:
            with zero.weights_only_loads():
                path, _ = self.engine.load_checkpoint(local, tag=ckpt.TAG)
            if path is None:
                raise FileNotFoundError(f"checkpoint {url} has no DeepSpeed shards under {ckpt.TAG}/")
            self.rank_state = storage.read_json(os.path.join(local, ckpt.state_file(self.rank)))
        if self.ema is not None:
            from safetensors.torch import load_file

            if self.rank == 0 or not world_changed:
                self.ema.load_state_dict(load_file(os.path.join(local, ckpt.EMA_FILE)))
            if world_changed:
                broadcast_tensors(self.ema.shadow, self.device)

    def _open_outputs(self) -> None:
        from linearsr.trainer.tb import TBWriter

        storage.write_text_atomic(storage.join(self.run_url, "config.json"), config_text(self.cfg) + "\n")
        self.metrics = rundir.MetricsWriter(self.run_url, resume_step=self.step)
        if self.meta is not None and not any(r.get("step") == self.step for r in self.metrics.records):
            self.metrics.append(self.meta["record"])  # the checkpoint was saved, its record was not
        self.tb = TBWriter(self.run_url, step_offset=self.step_offset)
        self.tb.text("config", config_text(self.cfg), self.step)
        self.tb.text("code", f"linearsr code {code_id()} (`linearsr --version` prints the same id for the same files)", self.step)
        log.info("linearsr code %s", code_id())
        self.tb.flush()

    def _tmp(self, prefix: str) -> str:
        path = ckpt.local_tempdir(prefix)
        self.tmp_dirs.append(path)
        return path

    def data(self) -> None:
        from linearsr.data.loader import make_val_loader
        from linearsr.trainer.validate import collect

        self.train_loader = self._train_loader()
        self.train_iter = iter(self.train_loader)
        filler = next(self.train_iter)
        self.pending = [filler]
        val_loader = make_val_loader(self.cfg.data, self.rank, self.world)
        self.val_batches = collect(val_loader, self.model, self.cfg.validation.max_batches, filler, self.device)
        self.tags.relabel(self.val_batches)  # held-out batches get the tags training gives
        self.val_retries = val_loader.retries  # made in its worker processes (which end here)
        if self.rank_state is not None:  # last: setting the loaders up draws from torch's RNG (DataLoader seeds)
            ckpt.restore_rank_state(self.rank_state, self.gen)

    def _train_loader(self):
        """The data stream: on resume exactly where the checkpoint left it (every rank's loader
        position is in its state file); a fresh start, or a resume that cannot continue the old
        stream (another world size or worker count), gets a deterministic stream of its own."""
        from linearsr.data.loader import make_train_loader

        cfg = self.cfg
        seed = stable_hash("data", cfg.run.seed) >> 33
        position = (self.rank_state or {}).get("data")
        if position is not None:
            try:
                return make_train_loader(cfg.data, self.rank, self.world, seed, state=position)
            except ValueError as e:
                log.warning("the checkpoint's data position does not fit this run (%s); the data stream starts anew", e)
        if self.step:
            seed = stable_hash("data", cfg.run.seed, self.step) >> 33
            log.info("step %d: a new data stream (seed %d), not the one before the checkpoint", self.step, seed)
        return make_train_loader(cfg.data, self.rank, self.world, seed)

    # ------------------------------------------------------------------ training

    def _next_batch(self) -> tuple[dict, float]:
        t0 = time.perf_counter()
        batch = self.pending.pop() if self.pending else next(self.train_iter)
        return batch, time.perf_counter() - t0

    def train_step(self) -> tuple[float, float]:
        """One optimizer step (grad_accum micro-batches). Returns (mean loss, data wait seconds)."""
        from linearsr.data.batches import finish_batch

        cfg, engine = self.cfg, self.engine
        losses, wait = [], 0.0
        for _ in range(cfg.optim.grad_accum):
            batch, w = self._next_batch()
            wait += w
            batch = finish_batch(batch, cfg.data, self.device)  # data.degrade_on = "device": the LR is made here
            hr, lr = batch["hr"], batch["lr"]
            t = cfg.flow.sample_t(hr.shape[0], self.interval or FULL_RANGE, generator=self.gen)
            self.t_seen[0] = min(self.t_seen[0], float(t.min()))
            self.t_seen[1] = max(self.t_seen[1], float(t.max()))
            loss = engine(hr, lr, self.tags(batch), t.to(self.device)).mean()
            if cfg.faults.nan_at_step and self.step + 1 >= cfg.faults.nan_at_step:
                loss = loss * math.nan  # injected divergence: recorded, never hidden
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        self.step += 1
        self.samples += cfg.data.batch_size * cfg.optim.grad_accum * self.world
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return sum(losses) / len(losses), wait

    def maybe_die(self, during_checkpoint: bool) -> None:
        f = self.cfg.faults
        if not f.die_at_step or f.die_at_step != self.step or f.die_during_checkpoint != during_checkpoint \
                or f.die_rank != self.rank:
            return
        if f.die_once_marker:
            if os.path.exists(f.die_once_marker):
                return
            open(f.die_once_marker, "w").close()
        log.error("fault injection: worker %d exits at step %d%s", self.rank, self.step,
                  " while saving a checkpoint" if during_checkpoint else "")
        logging.shutdown()
        os._exit(1)

    def run(self) -> None:
        cfg = self.cfg
        if self.step >= cfg.run.steps:
            log.info("run %s already reached step %d of %d; nothing to do", self.run_url, self.step, cfg.run.steps)
            return
        self._reset_window()
        while self.step < cfg.run.steps:
            loss, wait = self.train_step()
            self.win_loss.append(loss)
            self.win_wait += wait
            self.maybe_die(during_checkpoint=False)
            if self.rank == 0 and self.step % cfg.run.log_every == 0:
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g", self.step, cfg.run.steps, loss,
                         current_lr(self.engine), grad_norm(self.engine))
            last = self.step == cfg.run.steps
            if self.step % cfg.validation.every == 0 or last:
                self.validate_and_record(save=last or self.step % cfg.checkpoint.every == 0)
        if self.rank == 0:
            self.tb.close()

    def _reset_window(self) -> None:
        self.win_loss: list[float] = []
        self.win_wait = 0.0
        self.win_start = time.perf_counter()
        self.win_samples = self.samples
        self.t_seen = [math.inf, -math.inf]

    # ------------------------------------------------------------------ validation, metrics, checkpoints

    def validate_and_record(self, save: bool) -> None:
        from linearsr.trainer.validate import evaluate

        cfg = self.cfg
        elapsed = time.perf_counter() - self.win_start
        loss_sum, loss_n, wait, elapsed_sum = all_sum([sum(self.win_loss), len(self.win_loss), self.win_wait, elapsed],
                                                      self.device)
        t_min, neg_t_max = all_min([self.t_seen[0], -self.t_seen[1]], self.device)
        raw_loss, raw_by_interval = evaluate(self.engine, self.val_batches, cfg.flow, self.interval, self.device)
        val_loss, by_interval = raw_loss, raw_by_interval
        if self.ema is not None:
            with self.ema.applied(self.model):
                val_loss, by_interval = evaluate(self.engine, self.val_batches, cfg.flow, self.interval, self.device)
        # storage retries: this process's (checkpoints, metrics, TensorBoard, and the loaders when they have no
        # worker processes) plus those of the loaders' worker processes
        workers = self.train_loader.retries + self.val_retries if cfg.data.num_workers else 0
        retries = storage.retry_count() - self.retry_base + workers
        skips = gather((self.train_loader.skips, retries))
        data_skips: dict[str, int] = {}
        for s, _ in skips:
            for reason, n in s.items():
                data_skips[reason] = data_skips.get(reason, 0) + n
        record = {
            "step": self.step,
            "samples": self.samples,
            "wall_time": time.time(),
            "train_loss": loss_sum / max(1.0, loss_n),
            "val_loss": val_loss,
            "val_loss_by_interval": by_interval,
            **({"val_loss_raw": raw_loss, "val_loss_raw_by_interval": raw_by_interval} if self.ema is not None else {}),
            "weights": "ema" if self.ema is not None else "raw",  # whose loss val_loss is
            "global_step": self.step_offset + self.step,
            "lr": current_lr(self.engine),
            "grad_norm": grad_norm(self.engine),
            "samples_per_s": (self.samples - self.win_samples) / max(1e-9, elapsed),
            "data_skips": data_skips,
            "checkpoint": ckpt.url_of(self.run_url, self.step) if save else None,
            "data_wait_frac": wait / max(1e-9, elapsed_sum),
            "storage_retries": sum(r for _, r in skips),
            "t_min": t_min,
            "t_max": -neg_t_max,
            "t_interval": self.interval.key if self.interval else None,
            "start_step": self.start_step,  # where this attempt began: 0, or the checkpoint it resumed
            "skipped_steps": int(self.engine.skipped_steps),  # optimizer steps DeepSpeed dropped (non-finite grads)
        }
        images = self._images() if cfg.validation.image_every and self.step % cfg.validation.image_every == 0 else None
        if save:
            self.save(record)
        if self.rank == 0:
            self.metrics.append(record)
            self.tb.scalars(record, self.step)
            if images is not None:
                self.tb.image("samples/lr_1nfe_nstep_hr", images, self.step)
            self.tb.flush()
            log.info("step %d: val_loss %.4f train_loss %.4f %.1f samples/s data wait %.0f%%%s", self.step, val_loss,
                     record["train_loss"], record["samples_per_s"], 100 * record["data_wait_frac"],
                     f", checkpoint {record['checkpoint']}" if save else "")
        self._reset_window()

    @torch.no_grad()
    def _images(self) -> torch.Tensor | None:
        """LR | 1-NFE | N-step | HR rows from this rank's first val batch (every rank samples: ZeRO-3)."""
        from linearsr.model.sampler import sample
        from linearsr.trainer.tb import image_grid

        vb = self.val_batches[0]
        n = min(self.cfg.validation.num_images, vb.hr.shape[0])
        lr, tags = vb.lr[:n].to(self.device), vb.tags[:n]
        self.engine.eval()
        with self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext():
            one = sample(self.model, lr, tags, steps=1, seed=self.cfg.run.seed).image
            many = sample(self.model, lr, tags, steps=self.cfg.validation.sample_steps, seed=self.cfg.run.seed,
                          shift=self.cfg.flow.shift).image
        self.engine.train()
        return image_grid(lr, one, many, vb.hr[:n]) if self.rank == 0 else None

    def save(self, record: dict) -> None:
        """Every rank saves its shards into a local temp dir and hashes them; Ray uploads them into
        one folder; after all uploads rank 0 checks the files and writes COMPLETE with every file's
        size and sha256."""
        import ray.train

        cfg = self.cfg
        url = record["checkpoint"]
        if self.rank == 0 and storage.exists(url):  # a damaged or interrupted save of this step: replaced whole
            log.warning("replacing the earlier, unusable save of step %d at %s", self.step, url)
            storage.rm(url, recursive=True)
        local = self._tmp("linearsr-ckpt-")
        self.engine.save_checkpoint(local, tag=ckpt.TAG)
        storage.write_json(os.path.join(local, ckpt.state_file(self.rank)),
                          ckpt.rank_state(self.gen, {"step": self.step, "data": self.train_loader.state_dict()}))
        if self.rank == 0:
            storage.write_json(os.path.join(local, ckpt.META), {
                "step": self.step, "samples": self.samples, "val_loss": record["val_loss"],
                "val_loss_by_interval": record["val_loss_by_interval"], "world_size": self.world,
                "zero_stage": cfg.deepspeed.zero_stage, "t_interval": record["t_interval"],
                "config": configlib.to_dict(cfg), "record": record, "code": code_id(),
                "global_step": record["global_step"], "weights": record["weights"],
                "init_weights": self.init_weights,
            })
            if self.ema is not None:
                from safetensors.torch import save_file

                save_file(self.ema.state_dict(), os.path.join(local, ckpt.EMA_FILE))
        files: dict[str, dict] = {}
        for rank, digests in enumerate(gather(ckpt.digest_files(local))):
            for rel, info in digests.items():
                if files.setdefault(rel, info) != info:
                    raise RuntimeError(f"ranks wrote different {rel} into checkpoint step {self.step} (rank {rank} differs)")

        def upload(checkpoint, dir_name: str):
            assert dir_name == ckpt.name_of(self.step), dir_name
            storage.upload_dir(checkpoint.path, url)
            ray_storage = ray.train.get_context().get_storage()
            return ray.train.Checkpoint(path=ray_storage.build_checkpoint_path_from_name(dir_name),
                                        filesystem=ray_storage.storage_filesystem)

        ray.train.report({"step": self.step, "val_loss": record["val_loss"]},
                         checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=ckpt.name_of(self.step), checkpoint_upload_fn=upload)
        self.maybe_die(during_checkpoint=True)
        dist.barrier()  # every rank's upload is done
        if self.rank == 0:
            ckpt.write_marker(url, files, self.step)
            ckpt.apply_retention(self.run_url, cfg.checkpoint.keep)
        shutil.rmtree(local, ignore_errors=True)
        self.tmp_dirs.remove(local)

    def close(self) -> None:
        if hasattr(self, "train_loader"):
            self.train_loader.close()
        for d in self.tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: config = {"config": TrainConfig.to_dict(), "run_url": RUN}."""
    cfg = configlib.from_dict(TrainConfig, config["config"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, config["run_url"])
    try:
        trainer.build()
        t1 = time.perf_counter()
        trainer.data()
        if trainer.rank == 0:
            log.info("ready at step %d in %.1f s (engine %.1f s, data %.1f s)", trainer.step,
                     time.perf_counter() - t0, t1 - t0, time.perf_counter() - t1)
        trainer.run()
    finally:
        trainer.close()
