"""`linearsr demo` (what `make demo` runs): the whole pipeline on this machine.

    photos -> shards -> TAG tagger -> local Ray head -> pretrain (a Ray Job, DeepSpeed ZeRO-2,
    2 workers; every crop tagged by the tagger) watched by the ESGF sidecar -> knee decision
    -> 4 expert fine-tunes in parallel (Ray Jobs) -> bundle (+ the same tagger) -> evaluation
    on the development photos (with the TAG ablation) -> report

Every stage is resumable: rerunning the command picks up where it stopped (the trainer resumes
from its last complete checkpoint, the sidecar from analysis/state.json, finished stages are
skipped). `--store s3` runs the same against a local S3 server (moto on 127.0.0.1): the shards
and the run dir live in a bucket, exactly as on a cluster with a real bucket."""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from pathlib import Path

log = logging.getLogger("linearsr.demo")

BUCKET = "linearsr-demo"


def _stage(n: int, total: int, text: str) -> None:
    print(f"\n=== [{n}/{total}] {text}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="runs/demo", help="local run folder (with --store s3: where the bundle and report go)")
    parser.add_argument("--config", default="configs/cpu_tiny.toml", help="the pretrain preset")
    parser.add_argument("--store", choices=["local", "s3"], default="local",
                        help="local folders (default) or a local S3 server standing in for a bucket")
    parser.add_argument("--shards", default="runs/data/shards", help="photo shards (`make data` builds them)")
    parser.add_argument("--devset", default="runs/data/devset", help="evaluation photos (`make devset` writes them)")
    parser.add_argument("--eval-steps", type=int, default=10, help="the multi-step sampling setting of the evaluation")
    parser.add_argument("--keep-cluster", action="store_true", help="leave the local Ray head running at the end")
    parser.add_argument("overrides", nargs="*", help="config overrides for the pretrain, e.g. run.steps=200")


def _require(path: str, how: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; {how}")


def _s3_setup(shards: str, run_local: str) -> tuple[str, str, object]:
    """Start the local S3 server, put the shards in a bucket; returns (shards URL, run URL, server)."""
    import fsspec

    from linearsr.data import s3local

    server = s3local.running("runs/s3") or s3local.start("runs/s3")
    os.environ.update(server.env())  # this process, the Ray head and its jobs all talk to it
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": server.endpoint})
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    shards_url = f"s3://{BUCKET}/shards"
    if not fs.exists(f"{BUCKET}/shards/manifest.json"):
        # the manifest last, so a reader never sees it before the shards it lists
        for split in ("train", "val"):
            fs.put(os.path.join(shards, split), f"{BUCKET}/shards/{split}", recursive=True)
        fs.put(os.path.join(shards, "manifest.json"), f"{BUCKET}/shards/manifest.json")
    print(f"local S3 server {server.endpoint}: shards at {shards_url}")
    return shards_url, f"s3://{BUCKET}/runs/{os.path.basename(run_local.rstrip('/'))}", server


def run(args: argparse.Namespace) -> int:
    from linearsr.ckpt_analysis.sidecar import Sidecar, wait_for_run
    from linearsr.cluster import local
    from linearsr.cluster.jobs import Jobs, command
    from linearsr.trainer.evaluate import evaluate
    from linearsr.trainer.export import export_bundle
    from linearsr.trainer.rundir import RunDir, exists, fs_for, read_json, read_json_or_none, write_json
    from linearsr.model.tagger import Tagger
    from linearsr.trainer.tagger import add_to_bundle, train_tagger

    total = 7
    started = time.monotonic()
    _require(os.path.join(args.shards, "manifest.json"), "`make data` fetches the photos and builds the shards")
    _require(args.devset, "`make devset` writes the evaluation photos")
    _require(args.config, "the presets are in configs/")
    run_local = os.path.abspath(args.run)
    os.makedirs(run_local, exist_ok=True)

    _stage(1, total, f"data: {args.shards} ({args.store})")
    shards, run_url = os.path.abspath(args.shards), run_local
    if args.store == "s3":
        shards, run_url, _ = _s3_setup(args.shards, run_local)
    run = RunDir(run_url)

    _stage(2, total, "TAG tagger on the shards' photo tags (frozen ImageNet AlexNet features, thresholds for precision)")
    tagger_file = os.path.join(run_local, "tagger.safetensors")  # where the pretrain keeps its copy (trainer/tagsource.py)
    if not os.path.exists(tagger_file.removesuffix(".safetensors") + ".json"):
        tagger, report = train_tagger(shards)
        tagger.save(tagger_file)
        val = report["tagger"]["val"]
        print(f"tagger: {len(tagger.emitted)} of {len(tagger.vocab)} tags on ({', '.join(tagger.emitted)}); val photos: "
              f"mean AUC {val['mean_auc']:.3f}, precision {val['precision'] if val['precision'] is not None else '—'}")
    print(f"tagger: {tagger_file} (every pretrain and expert crop is tagged by it)")

    _stage(3, total, "local Ray cluster")
    state_dir = "runs/ray" if args.store == "local" else "runs/ray-s3demo"
    own_head = local.attach(state_dir) is None
    cluster = local.start(state_dir, num_cpus=max(4, 2 * (os.cpu_count() or 2)))
    print(f"Ray Jobs API: {cluster.jobs_address}   (dashboard: the same address in a browser)")
    jobs = Jobs(cluster.jobs_address)
    try:
        bundle_local = os.path.join(run_local, "bundle")
        if not exists(run.manifest):
            _stage(4, total, "pretrain (Ray Job: linearsr train, DeepSpeed ZeRO-2 on 2 workers)")
            demo_state_path = os.path.join(run_local, "demo.json")
            demo_state = read_json_or_none(demo_state_path) or {}
            job_id = demo_state.get("pretrain_job")
            if job_id is None or jobs.info(job_id) is None:
                job_id = f"demo-pretrain-{uuid.uuid4().hex[:8]}"
                write_json(demo_state_path, {**demo_state, "pretrain_job": job_id, "run": run_url})
            entry = command("train", "--config", os.path.abspath(args.config), "--run", run_url,
                            f"data.shards={shards}", "tags.source=tagger", f"tags.tagger={tagger_file}", *args.overrides)
            info = jobs.submit(job_id, entry, num_cpus=0)
            print(f"job {job_id} {info.status}\n  follow it:    ray job logs -f {job_id} --address {cluster.jobs_address}"
                  f"\n  TensorBoard:  make tensorboard  (then http://127.0.0.1:6006)")

            _stage(5, total, "ESGF sidecar: knee decision, then 4 expert fine-tunes in parallel")
            wait_for_run(run_url, job_id, cluster.jobs_address, poll_seconds=2)
            rc = Sidecar(run_url, pretrain_job=job_id, ray_address=cluster.jobs_address, poll_seconds=5).watch()
            if rc != 0:
                print(f"the sidecar stopped without a bundle; see {run.state} and `ray job logs {job_id}`")
                return rc
            pretrain = jobs.info(job_id)
            if pretrain is not None and not pretrain.terminal:
                jobs.wait(job_id)
        else:
            print(f"\n=== [4-5/{total}] bundle already written at {run.bundle}: pretrain and experts skipped")
        decision = read_json(run.decision)
        print(f"knee: step {decision['knee_step']} -> {decision['checkpoint']}\n  why: {decision['reason']}")
        if args.store == "s3":  # researchers upscale from a local copy
            fs, path = fs_for(run.bundle)
            fs.get(path, bundle_local, recursive=True)

        _stage(6, total, "knee model alone (for the ablation): export of the knee checkpoint")
        knee_dir = os.path.join(run_local, "knee")
        if not os.path.exists(os.path.join(knee_dir, "manifest.json")):
            export_bundle(decision["checkpoint"], knee_dir, knee_step=decision["knee_step"])

        from linearsr.model.bundle import read_manifest

        for folder in (bundle_local, knee_dir):  # the tagger the models were trained with
            if not read_manifest(folder).get("tagger"):
                add_to_bundle(Tagger.load(tagger_file), folder)

        _stage(7, total, f"evaluation on {args.devset} (bicubic x4 LR, 1-NFE and {args.eval_steps}-step, TAG and other ablations)")
        report_dir = os.path.join(run_local, "report")
        metrics = evaluate(bundle_local, args.devset, report_dir, steps=args.eval_steps, compare={"knee model": knee_dir})
    finally:
        if own_head and not args.keep_cluster:
            local.stop(state_dir)

    s, c = metrics["summary"], metrics["checks"]
    one, multi = s["LinearSR 1-NFE"], s[f"LinearSR {args.eval_steps}-step"]
    print("\n=== done in {:.1f} min".format((time.monotonic() - started) / 60))
    print(f"bicubic        PSNR-Y {s['bicubic']['psnr_y']:.2f} dB   LPIPS {s['bicubic']['lpips'] or float('nan'):.3f}")
    print(f"LinearSR 1-NFE PSNR-Y {one['psnr_y']:.2f} dB ({c['psnr_gain_1nfe_db']:+.2f})   LPIPS {one['lpips'] or float('nan'):.3f}")
    print(f"LinearSR {args.eval_steps}-step PSNR-Y {multi['psnr_y']:.2f} dB   LPIPS {multi['lpips'] or float('nan'):.3f}")
    print(f"report:      {os.path.join(report_dir, 'report.md')}  (crops in {os.path.join(report_dir, 'crops')})")
    print(f"bundle:      {bundle_local}   try: linearsr upscale --bundle {bundle_local} IMAGE --out OUT")
    print(f"curve:       {run.curve}")
    print(f"TensorBoard: make tensorboard  (logs under {run.tb}, experts under {run.path('experts')})")
    return 0
