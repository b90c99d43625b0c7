"""`linearsr demo` (what `make demo` runs): the whole pipeline on this machine.

    photos -> shards -> TAG tagger -> local Ray head -> pretrain (a Ray Job, DeepSpeed ZeRO-2,
    2 workers; every crop tagged by the tagger) watched by the ESGF sidecar -> knee decision, the
    pretrain stopped there -> the expert tree (2 halves, then 4 leaves, each level in parallel, Ray
    Jobs) beside an equal-compute full-range control -> bundle (+ the same tagger) -> evaluation
    with the ablations (TAG: no / shuffled tags, CFG) -> report

The ablation (same photos, seed and sampler; 1-NFE and an N-step grid that runs every leaf):
bicubic; the pretrain's last checkpoint; the knee checkpoint; the knee fine-tuned once over the
full range for as many steps as the whole tree (equal training compute); the MoE tree.

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

log = logging.getLogger("linearsr.dev.demo")

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
    parser.add_argument("--eval-steps", type=int, default=10,
                        help="the multi-step setting of the evaluation (raised until it runs every leaf expert)")
    parser.add_argument("--keep-cluster", action="store_true", help="leave the local Ray head running at the end")
    parser.add_argument("overrides", nargs="*", help="config overrides for the pretrain, e.g. run.steps=200")


def _require(path: str, how: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; {how}")


def _s3_setup(shards: str, run_local: str) -> tuple[str, str, object]:
    """Start the local S3 server, put the shards in a bucket; returns (shards URL, run URL, server)."""
    from linearsr.core import storage
    from linearsr.dev import s3local

    server = s3local.running("runs/s3") or s3local.start("runs/s3")
    os.environ.update(server.env())  # this process, the Ray head and its jobs all talk to it
    if not storage.exists(f"s3://{BUCKET}"):
        server.make_bucket(BUCKET)
    shards_url = f"s3://{BUCKET}/shards"
    if not storage.exists(f"{shards_url}/manifest.json"):
        # the manifest last, so a reader never sees it before the shards it lists
        storage.upload_dir(shards, shards_url, [rel for rel in storage.find(shards) if rel != "manifest.json"])
        storage.put_file(os.path.join(shards, "manifest.json"), f"{shards_url}/manifest.json")
    print(f"local S3 server {server.endpoint}: shards at {shards_url}")
    return shards_url, f"s3://{BUCKET}/runs/{os.path.basename(run_local.rstrip('/'))}", server


def run(args: argparse.Namespace) -> int:
    from linearsr.ckpt_analysis.sidecar import Sidecar, wait_for_run
    from linearsr.cluster.jobs import Jobs, command
    from linearsr.core import storage
    from linearsr.core.storage import exists, read_json, read_json_or_none, write_json
    from linearsr.dev import local_ray as local
    from linearsr.model.tagger import Tagger
    from linearsr.trainer.evaluate import evaluate, every_expert_steps
    from linearsr.trainer.export import export_bundle
    from linearsr.trainer.rundir import RunDir
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
            _stage(4, total, "pretrain (Ray Job: linearsr train, DeepSpeed ZeRO-2 on 2 workers), stopped at the knee")
            demo_state_path = os.path.join(run_local, "demo.json")
            demo_state = read_json_or_none(demo_state_path) or {}
            job_id = demo_state.get("pretrain_job")
            if job_id is None or jobs.info(job_id) is None:
                job_id = f"demo-pretrain-{uuid.uuid4().hex[:8]}"
                write_json(demo_state_path, {**demo_state, "pretrain_job": job_id, "run": run_url})
            entry = command("train", "--config", os.path.abspath(args.config), "--run", run_url,
                            f"data.shards={shards}", "esgf.experts.control=true", "tags.source=tagger",
                            f"tags.tagger={tagger_file}", *args.overrides)
            info = jobs.submit(job_id, entry, num_cpus=0)
            print(f"job {job_id} {info.status}\n  follow it:    ray job logs -f {job_id} --address {cluster.jobs_address}"
                  f"\n  TensorBoard:  make tensorboard  (then http://127.0.0.1:6006)")

            _stage(5, total, "ESGF sidecar: knee -> stop the pretrain -> the expert tree (2, then 4 in parallel) "
                             "beside the equal-compute control")
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
        decision, state = read_json(run.decision), read_json(run.state)
        _print_esgf(decision, state)
        if args.store == "s3":  # researchers upscale from a local copy
            storage.download_dir(run.bundle, bundle_local)

        _stage(6, total, "the ablation's controls as 1-expert bundles (EMA weights)")
        compare = {}
        for name, folder, ckpt_url in _controls(run, decision, state):
            out = os.path.join(run_local, folder)
            if not os.path.exists(os.path.join(out, "manifest.json")):
                export_bundle(ckpt_url, out, knee_step=decision["knee_step"])
            compare[name] = out
            print(f"{name:34s} {out}  <- {ckpt_url}")

        from linearsr.model.bundle import read_manifest

        for folder in (bundle_local, *compare.values()):  # the tagger the models were trained with
            if not read_manifest(folder).get("tagger"):
                add_to_bundle(Tagger.load(tagger_file), folder)

        steps = every_expert_steps(bundle_local, at_least=args.eval_steps)
        _stage(7, total, f"evaluation on {args.devset} (bicubic x4 LR, 1-NFE and {steps}-step, ablations)")
        report_dir = os.path.join(run_local, "report")
        metrics = evaluate(bundle_local, args.devset, report_dir, steps=steps, compare=compare,
                           baselines=("realesrgan",))  # a note instead of the row where `make peers` could not set it up
    finally:
        if own_head and not args.keep_cluster:
            local.stop(state_dir)

    print("\n=== done in {:.1f} min".format((time.monotonic() - started) / 60))
    _print_table(metrics)
    for name, route in metrics["routes"].items():
        if name.startswith("LinearSR"):
            print(f"route of {name}: {route}")
    print(f"report:      {os.path.join(report_dir, 'report.md')}  (crops in {os.path.join(report_dir, 'crops')})")
    print(f"bundle:      {bundle_local}   try: linearsr upscale --bundle {bundle_local} IMAGE --out OUT")
    print(f"curve:       {run.curve}")
    print(f"TensorBoard: make tensorboard  (logs under {run.tb}, experts under {run.path('experts')})")
    return 0


def _controls(run, decision: dict, state: dict) -> list[tuple[str, str, str]]:
    """(row name, folder under the demo's run dir, checkpoint URL) of each ablation control."""
    from linearsr.trainer.checkpoint import latest_complete

    rows = [("pretrain, last checkpoint", "pretrain_last", latest_complete(run.url).url),
            ("knee checkpoint", "knee", decision["checkpoint"])]
    control = (state.get("tree") or {}).get("control") or {}
    if control.get("best"):
        rows.append((f"knee + full range, {control['steps']} steps", "control", control["best"]["checkpoint"]))
    else:
        print(f"the equal-compute control has no checkpoint ({control.get('status', 'not run')}): its row is missing")
    return rows


def _print_esgf(decision: dict, state: dict) -> None:
    """The knee, where the pretrain stopped, and the tree, as the sidecar recorded them."""
    print(f"knee: step {decision['knee_step']}, confirmed at step {decision.get('confirmed_at')} -> "
          f"{decision['checkpoint']}\n  why: {decision['reason']}")
    stop = state.get("pretrain_stopped")
    print(f"pretrain stopped after step {stop['last_step']} ({stop['kind']}): {stop['reason']}" if stop
          else "the pretrain was not stopped (it ran to its budget)")
    tree = state.get("tree") or {}
    print(f"tree ({tree.get('split')} split, edges {tree.get('edges')}, init {tree.get('init')}):")
    for node_id, n in sorted((tree.get("nodes") or {}).items(), key=lambda kv: (kv[1]["level"], kv[1]["index"])):
        best = n["best"] or {}
        print(f"  {node_id:6s} λ [{n['interval'].replace(',', ', ')})  from {n['parent']:8s} -> best step "
              f"{best.get('step')} (val loss {best.get('val_loss', float('nan')):.4f})")
    control = tree.get("control")
    if control:
        best = control.get("best") or {}
        print(f"  control λ [-inf, inf) {control['steps']} steps from the knee -> best step {best.get('step')} "
              f"(val loss {best.get('val_loss', float('nan')):.4f})")


def _print_table(metrics: dict) -> None:
    s, base = metrics["summary"], metrics["summary"]["bicubic"]["psnr_y"]
    print(f"{'variant':48s} {'PSNR-Y':>7s} {'Δ':>6s} {'SSIM-Y':>7s} {'LPIPS':>6s} {'s/img':>6s}")
    for name, r in s.items():
        lpips = "   —  " if r["lpips"] is None else f"{r['lpips']:6.3f}"
        print(f"{name:48s} {r['psnr_y']:7.2f} {r['psnr_y'] - base:+6.2f} {r['ssim_y']:7.4f} {lpips} {r['seconds']:6.2f}")
