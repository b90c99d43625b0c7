"""`linearsr train` end to end on CPU: a local Ray, 2 workers, DeepSpeed on gloo, real photos.

The trainings are few and shared (each fit costs ~15-20 s of start-up here) and run as Ray Jobs
on the session's local head, submitted with `linearsr submit` (see the `runs` fixture)."""

from __future__ import annotations

import math
import os
import shutil
import uuid

import pytest

from linearsr.core import storage
from linearsr.core.codeid import code_id
from linearsr.main import main
from linearsr.model.flow import FlowConfig, Interval
from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer import rundir
from tests.support.faultproxy import FaultProxy

pytestmark = pytest.mark.integration

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cpu_tiny.toml")
SMALL = [  # cpu_tiny, smaller batches and validation so a step takes ~0.1 s
    "data.batch_size=4", "data.crop=64", "data.val_crop=64", "data.num_workers=0", "data.shuffle_buffer=8",
    "validation.every=10", "validation.max_batches=1", "validation.sample_steps=2", "flow.val_points_per_interval=2",
    "optim.lr=2e-3", "optim.warmup_steps=5", "run.log_every=10",
    "flow.split=lambda", "optim.schedule=cosine", "optim.min_lr=1e-4",  # the intervals and schedule tested below
    "tags.source=photo",  # the shards' own tags: these tests are about training, not the tagger
]
SAMPLES_PER_STEP = 4 * 2  # batch x workers


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> str:
    """Shards of six real photos (scikit-image and scikit-learn samples, halved): 1 per shard."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from linearsr.data.shards import build_shards

    base = tmp_path_factory.mktemp("photos")
    images = {n: getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")}
    images.update(zip(("china", "flower"), load_sample_images().images))
    for name, arr in images.items():
        img = Image.fromarray(arr).convert("RGB")
        img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS).save(base / f"{name}.png")
    build_shards(str(base), str(base / "shards"), samples_per_shard=1, val_fraction=0.3, progress=False)
    return str(base / "shards")


class Runs:
    """The module's trainings, submitted with `linearsr submit` as Ray Jobs to the session's local
    head; independent ones run at the same time (as the sidecar runs its experts)."""

    def __init__(self, address: str):
        from linearsr.cluster.jobs import Jobs

        self.address, self.jobs = address, Jobs(address)
        self.tag = uuid.uuid4().hex[:6]

    def submit(self, name: str, *args: str) -> str:
        sid = f"test-train-{name}-{self.tag}"
        assert main(["submit", "--address", self.address, "--submission-id", sid, "--config", CONFIG,
                     *SMALL, *args]) == 0
        return sid

    def wait(self, sid: str) -> None:
        info = self.jobs.wait(sid, timeout=600)
        assert info.status == "SUCCEEDED", f"{sid} {info.status}:\n{self.jobs.logs_tail(sid, 80)}"


@pytest.fixture(scope="module")
def runs(ray_cluster, photo_shards, s3_server, tmp_path_factory) -> dict:
    """zero2: ZeRO-2, local run dir, worker 1 killed at step 30 (checkpoints every 20 steps).
    zero2_clean: the same run, uninterrupted (in parallel with zero2).
    resized: a copy of zero2 at step 60 whose newest checkpoint was then damaged, continued to
             step 70 on ONE worker.
    zero3_s3: ZeRO-3, run dir on the local S3 server (in parallel with zero2), worker 1 killed
              while saving the step-20 checkpoint (checkpoints every 10 steps); then a 2-worker
              fine-tune --init its last checkpoint. Both through a proxy that counts the bytes read.
    finetune: --init zero2's last checkpoint --t-interval=0,3 for 20 steps, then rerun to 30
              with a NaN loss injected from step 25 on."""
    tmp = tmp_path_factory.mktemp("train")
    r = Runs(ray_cluster)
    out = {"zero2": str(tmp / "zero2"), "zero3_s3": f"{s3_server.make_bucket('zero3')}/runs/zero3",
           "finetune": str(tmp / "finetune"), "marker": str(tmp / "died"), "zero2_clean": str(tmp / "zero2-clean"),
           "resized": str(tmp / "resized")}
    shards = f"data.shards={photo_shards}"
    zero2 = [shards, "run.steps=60", "checkpoint.every=20", "validation.image_every=30"]
    z2 = r.submit("zero2", *zero2, "faults.die_at_step=30", "faults.die_rank=1", f"faults.die_once_marker={out['marker']}",
                  "--run", out["zero2"])
    clean = r.submit("zero2-clean", *zero2, "--run", out["zero2_clean"])
    reads = FaultProxy(s3_server.endpoint).__enter__()  # forwards untouched, counts what is read
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("AWS_ENDPOINT_URL", reads.url)  # the jobs get the endpoint of their submitter
    z3 = r.submit("zero3", shards, "deepspeed.zero_stage=3", "optim.ema_decay=0", "run.steps=30", "checkpoint.every=10",
                  "validation.image_every=30", "faults.die_at_step=20", "faults.die_during_checkpoint=true",
                  f"faults.die_once_marker={out['marker']}-z3", "--run", out["zero3_s3"])
    r.wait(z2)
    shutil.copytree(out["zero2"], out["resized"])
    with open(os.path.join(ckpt.url_of(out["resized"], 60), "ds", "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "r+b") as f:
        f.seek(-64, os.SEEK_END)  # the file keeps its size: only the checksum can tell
        f.write(b"\0" * 64)
    r.wait(r.submit("resized", shards, "run.steps=70", "checkpoint.every=10", "validation.image_every=0",
                    "cluster.num_workers=1", "--run", out["resized"]))
    out["resized_log"] = r.jobs.logs_tail(f"test-train-resized-{r.tag}", 100000)
    ft = [shards, "checkpoint.every=10", "validation.image_every=0", "--run", out["finetune"],
          "--init", ckpt.url_of(out["zero2"], 60), "--t-interval=0,3"]
    r.wait(r.submit("finetune", "run.steps=20", *ft))
    out["finetune_first"] = rundir.read_metrics(out["finetune"])
    r.wait(r.submit("finetune-more", "run.steps=30", "faults.nan_at_step=25", *ft))
    r.wait(z3)
    z3_init = ckpt.url_of(out["zero3_s3"], 30)
    r.wait(r.submit("init-from-s3", shards, "run.steps=10", "validation.image_every=0", "--init", z3_init,
                    "--run", str(tmp / "init-from-s3")))
    monkeypatch.undo()
    reads.__exit__()
    out["bytes_read"], out["z3_init"] = reads.bytes_served, z3_init
    r.wait(clean)
    out["zero3_log"] = r.jobs.logs_tail(z3, 100000)
    return out


@pytest.fixture(scope="module")
def zero2(runs) -> str:
    assert os.path.exists(runs["marker"]), "the injected worker failure did not happen"
    return runs["zero2"]


@pytest.fixture(scope="module")
def finetune(runs) -> tuple[str, list[dict]]:
    return runs["finetune"], runs["finetune_first"]


@pytest.fixture(scope="module")
def zero3_s3(runs) -> str:
    return runs["zero3_s3"]


def test_zero2_validation_loss_decreases(zero2):
    val = [r["val_loss"] for r in rundir.read_metrics(zero2)]
    assert val[-1] < val[0], val


def test_metrics_schema_and_intervals(zero2):
    records = rundir.read_metrics(zero2)
    keys = [iv.key for iv in FlowConfig(shift=3.0, split="lambda").intervals()]  # cpu_tiny's shift, SMALL's split
    assert keys == ["-inf,-3", "-3,0", "0,3", "3,inf"]
    for r in records:
        assert set(rundir.METRIC_FIELDS) <= set(r), set(rundir.METRIC_FIELDS) - set(r)
        assert list(r["val_loss_by_interval"]) == keys
        assert all(v > 0 for v in r["val_loss_by_interval"].values())
        assert 0 <= r["data_wait_frac"] <= 1 and r["samples_per_s"] > 0 and r["grad_norm"] > 0
        assert r["samples"] == r["step"] * SAMPLES_PER_STEP
        # cpu_tiny keeps EMA weights: val_loss is theirs (what the sidecar decides on), the raw loss beside it
        assert r["weights"] == "ema" and math.isfinite(r["val_loss_raw"]) and r["global_step"] == r["step"]


def test_killed_worker_resumes_from_last_checkpoint(zero2):
    records = rundir.read_metrics(zero2)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]  # no gap, no duplicate, no restart
    assert [r["start_step"] for r in records] == [0, 0, 20, 20, 20, 20]  # killed at 30, resumed from 20
    # the schedule resumed too (a fresh one would warm up again): lr after s steps = lr * factor(s)
    from linearsr.trainer.engine import lr_factor

    assert [r["lr"] for r in records] == pytest.approx(
        [2e-3 * lr_factor(r["step"], 60, 5, "cosine", 1e-4 / 2e-3) for r in records])


def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(zero2, runs):
    """Killed at step 30, resumed from the step-20 checkpoint: the same data, the same random
    streams, the same optimizer and schedule state, so every loss equals the uninterrupted run's
    to the last digit (CPU runs are deterministic)."""
    def losses(run):
        return [(r["step"], r["train_loss"], r["val_loss"], r["val_loss_by_interval"], r["grad_norm"], r["samples"])
                for r in rundir.read_metrics(run)]

    assert [r["start_step"] for r in rundir.read_metrics(zero2)][-1] == 20  # it did resume
    assert losses(zero2) == losses(runs["zero2_clean"])


def test_a_damaged_checkpoint_is_passed_over_and_a_new_world_size_resumes(runs):
    """The newest checkpoint fails its checksum: it is marked CORRUPT with the reason and the one
    before is used; that one was saved by 2 workers and is resumed by 1 (weights, step, schedule
    and sample count kept; Adam moments and the data stream start anew: docs/operations.md)."""
    run, log = runs["resized"], runs["resized_log"]
    assert "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its sha256 in COMPLETE" in log
    assert "marking it CORRUPT" in log and "saved by 2 workers, now 1" in log
    assert "replacing the earlier, unusable save of step 60" in log and ckpt.is_complete(ckpt.url_of(run, 60))
    records = rundir.read_metrics(run)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60, 70]
    assert [r["start_step"] for r in records][-3:] == [40, 40, 40]  # from 40; 60 retrained (no step twice)
    assert records[-1]["samples"] == 40 * SAMPLES_PER_STEP + 30 * 4  # 2 workers' samples, then 1's
    assert ckpt.read_meta(ckpt.url_of(run, 70))["world_size"] == 1
    assert records[-1]["val_loss"] < records[0]["val_loss"]


def test_checkpoints_complete_and_named_in_metrics(zero2):
    found = ckpt.list_checkpoints(zero2)
    assert [(f.step, f.complete) for f in found] == [(20, True), (40, True), (60, True)]
    by_step = {r["step"]: r["checkpoint"] for r in rundir.read_metrics(zero2)}
    assert by_step == {10: None, 20: found[0].url, 30: None, 40: found[1].url, 50: None, 60: found[2].url}
    meta = ckpt.read_meta(found[-1].url)
    assert meta["step"] == 60 and meta["samples"] == 60 * SAMPLES_PER_STEP and meta["zero_stage"] == 2
    assert meta["config"]["faults"]["die_at_step"] == 30
    assert meta["code"] == code_id()  # the job ran the files this checkout shipped with it
    assert storage.read_json(storage.join(zero2, "config.json"))["run"]["url"] == zero2


def test_tensorboard_has_scalars_image_and_config(zero2):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(storage.join(zero2, "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/val_loss", "loss/train_loss", "train/lr", "train/grad_norm", "val_loss_by_interval/0,3"):
        assert tag in tags["scalars"], tags["scalars"]
    assert sorted({e.step for e in acc.Scalars("loss/val_loss")}) == [10, 20, 30, 40, 50, 60]
    image = acc.Images("samples/lr_1nfe_nstep_hr")[-1]
    assert image.step == 60 and image.width == 4 * 64 and image.height % 64 == 0  # rows of LR|1-NFE|N-step|HR
    assert any(t.startswith("config") for t in tags["tensors"])
    code_text = [e.tensor_proto.string_val[0].decode() for t in tags["tensors"] if t.startswith("code")
                 for e in acc.Tensors(t)]
    assert code_text and f"linearsr code {code_id()}" in code_text[-1]


def test_finetune_draws_t_only_inside_its_interval(finetune):
    run, _ = finetune
    interval = Interval.parse("0,3")
    t_min, t_max = interval.t_range
    records = rundir.read_metrics(run)
    for r in records:
        assert t_min <= r["t_min"] <= r["t_max"] <= t_max, (r["t_min"], r["t_max"], interval.t_range)
        assert list(r["val_loss_by_interval"]) == ["0,3"] and r["t_interval"] == "0,3"
        assert r["val_loss"] == r["val_loss_by_interval"]["0,3"] or math.isnan(r["val_loss"])
    assert ckpt.read_meta(ckpt.url_of(run, 30))["t_interval"] == "0,3"


def test_finetune_starts_from_init_weights_at_step_zero(finetune, zero2):
    run, first = finetune
    pretrain = rundir.read_metrics(zero2)
    assert first[0]["step"] == 10 and first[0]["start_step"] == 0
    # starting from the pretrained weights, its first validation beats the pretrain's first one
    assert first[0]["val_loss"] < pretrain[0]["val_loss_by_interval"]["0,3"]
    # it started from the EMA weights, and its step axis continues the pretrain's (60 + own step)
    assert ckpt.read_meta(ckpt.url_of(run, 20))["init_weights"] == "ema"
    assert [r["global_step"] for r in first] == [70, 80]


def test_rerun_on_existing_run_dir_resumes(finetune):
    run, first = finetune
    records = rundir.read_metrics(run)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[:2] == first  # the curve up to the checkpoint is kept as it was
    assert records[2]["start_step"] == 20


def test_nan_loss_is_recorded_not_hidden(finetune):
    run, _ = finetune
    *before, last = rundir.read_metrics(run)
    assert last["step"] == 30 and math.isnan(last["train_loss"])
    # DeepSpeed drops an optimizer step whose gradients are not finite: the weights stay usable
    assert last["skipped_steps"] == 6 and all(r["skipped_steps"] == 0 for r in before)  # steps 25..30
    assert math.isfinite(last["val_loss"])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert '"train_loss": "nan"' in f.read().splitlines()[-1]


def test_zero3_on_s3_run_dir(zero3_s3):
    records = rundir.read_metrics(zero3_s3)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    url = f"{zero3_s3}/checkpoints/checkpoint_000030"
    assert records[-1]["checkpoint"] == url
    assert [(f.step, f.complete) for f in ckpt.list_checkpoints(zero3_s3)] == [(10, True), (20, True), (30, True)]
    meta = ckpt.read_meta(url)
    assert meta["zero_stage"] == 3 and meta["world_size"] == 2
    assert storage.read_json(f"{zero3_s3}/config.json")["deepspeed"]["zero_stage"] == 3
    assert any("tfevents" in name for name in storage.ls(f"{zero3_s3}/tb"))


def test_each_checkpoint_file_is_read_once_on_resume_and_on_init(runs):
    """Resume: each rank reads its own partition (not every rank every file). --init: rank 0
    consolidates the checkpoint once and broadcasts the weights (not every rank of every job)."""
    served = runs["bytes_read"]

    def read(url: str, times) -> tuple[dict, dict]:
        files = {rel: info["size"] for rel, info in ckpt.read_marker(url)["files"].items() if rel.startswith("ds/")}
        assert sum("zero_pp_rank_" in rel for rel in files) == 4  # ZeRO-3 on 2 ranks: model + optimizer each
        prefix = "/" + url[len("s3://"):] + "/"
        return {rel: served[prefix + rel] for rel in files}, {rel: size * times(rel) for rel, size in files.items()}

    # resumed from: a rank's own partitions once, the shared file (schedule, client state) once per rank
    got, want = read(ckpt.url_of(runs["zero3_s3"], 10), lambda rel: 1 if "zero_pp_rank_" in rel else 2)
    assert got == want
    # initialised from, by a 2-worker fine-tune: every file once (rank 0 consolidates, then broadcasts)
    got, want = read(runs["z3_init"], lambda rel: 1)
    assert got == want


def test_crash_while_saving_is_skipped_on_resume_with_a_reason(runs):
    records = rundir.read_metrics(runs["zero3_s3"])
    assert os.path.exists(runs["marker"] + "-z3"), "the injected failure during the save did not happen"
    assert [r["start_step"] for r in records] == [0, 10, 10]  # step 20's save was partial: resumed from 10
    log = runs["zero3_log"]
    assert "skipping checkpoint" in log and "checkpoint_000020: no COMPLETE marker, its save was interrupted" in log
    assert f"resuming from {runs['zero3_s3']}/checkpoints/checkpoint_000010" in log  # and which one it took instead


def test_export_zero3_checkpoint_loads_in_upscale(zero3_s3, tmp_path):
    import numpy as np
    from PIL import Image

    from linearsr.model.bundle import read_expert_meta, read_manifest

    url = f"{zero3_s3}/checkpoints/checkpoint_000030"
    out = tmp_path / "bundle"
    assert main(["export", url, str(out)]) == 0
    meta = read_expert_meta(out / "model.safetensors")
    assert meta["step"] == 30 and meta["checkpoint"] == url and meta["interval"] == "-inf,inf"
    assert read_manifest(out)["experts"][0]["interval"] == ["-inf", "inf"]
    Image.fromarray((np.random.default_rng(0).random((16, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / "lr.png")
    assert main(["upscale", "--bundle", str(out), "--out", str(tmp_path / "sr"), "--steps", "2", str(tmp_path / "lr.png")]) == 0
    assert Image.open(tmp_path / "sr" / "lr.png").size == (80, 64)


def test_run_dir_in_a_missing_bucket_is_one_line(s3_server, photo_shards, capsys):
    code = main(["train", "--config", CONFIG, f"data.shards={photo_shards}", "--run", "s3://no-such-bucket-4a1/run"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "s3://no-such-bucket-4a1/run" in err and "bucket" in err and len(err.splitlines()) == 1, err
