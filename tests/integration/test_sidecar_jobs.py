"""The sidecar on a real local Ray cluster: the knee stops the pretrain, the expert tree runs
level by level (each level in parallel, every node from its parent's best checkpoint), restarts
submit nothing twice, failures are retried, early divergence stops the pretrain, S3 run dirs.

The fine-tune entrypoint here is a small stand-in trainer (FAKE_TRAINER): it takes exactly the
contract's arguments, writes the node's run dir (metrics.jsonl + checkpoints with their COMPLETE
marker; its best checkpoint is step 20) and can fail on purpose. Export writes real model weights
(save_expert of the tiny model) so the bundle is loaded back with the real `load_bundle`. The
end-to-end test with the real `linearsr train` lives in test_sidecar_e2e.py."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from linearsr.ckpt_analysis import experts as experts_mod
from linearsr.cluster.jobs import Jobs, command
from linearsr.core import storage
from linearsr.core.storage import exists, join, read_json, write_json
from linearsr.main import main
from linearsr.model.bundle import load_bundle, read_manifest, save_expert
from linearsr.model.config import ModelConfig
from linearsr.model.flow import FlowConfig
from linearsr.model.network import LinearSR
from linearsr.trainer.checkpoint import MARKER
from linearsr.trainer.rundir import MetricsWriter

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TREE = FlowConfig().tree()  # the run configs below have no [flow]: the default tree, depth 2
LEAVES = [n.interval.key for n in TREE[2]]  # -inf,-1.35 | -1.35,0 | 0,1.35 | 1.35,inf
NODES = {n.id: n for level in TREE for n in level}


def node_dir(run: str, node_id: str) -> str:
    iv = NODES[node_id].interval
    return join(run, "experts", f"{node_id}_{iv.key.replace(',', '_')}")


FAKE_TRAINER = textwrap.dedent('''
    import argparse, json, sys, time
    from linearsr.trainer.rundir import MetricsWriter
    from linearsr.core.storage import exists, join, read_json, write_json
    PLAN = json.loads({plan!r})
    p = argparse.ArgumentParser()
    for flag in ("--config", "--run", "--init", "--t-interval"):
        p.add_argument(flag, required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    t0 = time.time()
    read_json(a.config)
    behaviour = PLAN.get(a.t_interval, "ok")
    marker = join(a.run, "failed_once")
    if behaviour == "fail" or (behaviour == "fail_once" and not exists(marker)):
        write_json(marker, {{}})
        print(f"injected failure for interval {{a.t_interval}}", flush=True)
        sys.exit(3)
    time.sleep({sleep})
    # wait (up to 60 s) until every node of this level has started: the level runs in parallel
    name = a.run.rstrip("/").rsplit("/", 1)[-1]
    parent, level = a.run.rstrip("/").rsplit("/", 1)[0], name.split("-")[0]
    write_json(join(a.run, "started"), {{"at": t0}})
    siblings = [d for d in PLAN.get("dirs", []) if d.startswith(level + "-")]
    while PLAN.get("barrier") and sum(exists(join(parent, d, "started")) for d in siblings) < len(siblings) \\
            and time.time() < t0 + 60:
        time.sleep(0.2)
    w = MetricsWriter(a.run)
    for step, loss in ((10, 0.5), (20, 0.3), (30, 0.4)):
        ckpt = join(a.run, "checkpoints", f"checkpoint_{{step:06d}}")
        write_json(join(ckpt, "COMPLETE"), {{"files": []}})
        w.append({{"step": step, "val_loss": loss, "train_loss": loss, "checkpoint": ckpt,
                  "val_loss_by_interval": {{a.t_interval: loss}}}})
    write_json(join(a.run, "args.json"), {{"init": a.init, "interval": a.t_interval, "config": a.config,
                                           "overrides": a.overrides, "start": t0, "end": time.time()}})
''')


def fake_trainer(plan=None, sleep=0.5) -> str:
    dirs = [node_dir("x", i).rsplit("/", 1)[-1] for i in NODES if i != "L0-0"]
    return FAKE_TRAINER.format(plan=json.dumps({"dirs": dirs, **(plan or {})}), sleep=sleep)


def real_weights_export(ckpt_url, out_prefix):
    """Stand-in for the trainer's export (the stand-in checkpoints hold no DeepSpeed shards)."""
    torch_seed = int(ckpt_url.rstrip("/")[-6:])
    import torch

    torch.manual_seed(torch_seed)
    save_expert(out_prefix, LinearSR(ModelConfig.preset("cpu_tiny")), {"checkpoint": ckpt_url, "weights": "ema"})


@pytest.fixture
def fake_export(monkeypatch):
    monkeypatch.setattr(experts_mod, "_default_export", real_weights_export)


def make_pretrain_run(url, tmp_path, plan=None, n=30, nan_from=None, sleep=0.5, esgf=None, steps=4000):
    """A pretrain run dir: config.json + a decaying val curve with a checkpoint every 2nd
    validation; the leaves flatten at different steps (their own knees differ)."""
    script = tmp_path / f"fake_train_{uuid.uuid4().hex[:6]}.py"
    script.write_text(fake_trainer(plan, sleep))
    esgf_cfg = {"poll_seconds": 0.3, "experts": {"command": f"{sys.executable} {script}", "num_cpus": 0.5,
                                                  "max_retries": 1, "steps": 30}}
    for k, v in (esgf or {}).items():
        esgf_cfg[k] = {**esgf_cfg.get(k, {}), **v} if isinstance(v, dict) else v
    write_json(join(url, "config.json"), {"run": {"name": "x", "steps": steps}, "validation": {"every": 100},
                                          "model": ModelConfig.preset("cpu_tiny").to_dict(), "flow": {},
                                          "esgf": esgf_cfg})
    w = MetricsWriter(url)
    for i in range(n):
        step = 100 * (i + 1)
        v = math.nan if nan_from is not None and step >= nan_from else 0.5 * math.exp(-step / 600) + 0.1
        ckpt = join(url, "checkpoints", f"checkpoint_{step:06d}") if i % 2 else None
        if ckpt:
            write_json(join(ckpt, "meta.json"), {"step": step, "code": "0123456789ab"})  # trained by other code
            write_json(join(ckpt, MARKER), {"files": []})
        by = {k: 0.4 * math.exp(-step / tau) + 0.2 for k, tau in zip(LEAVES, (500, 400, 250, 150))}
        w.append({"step": step, "val_loss": v, "train_loss": v, "checkpoint": ckpt, "val_loss_by_interval": by})
    return url


def run_jobs(jobs: Jobs, url: str):
    return jobs.list(prefix=os.path.basename(url.rstrip("/")) + "-")


def test_jobs_wrapper_submit_is_idempotent_and_errors_are_one_line(ray_cluster):
    jobs = Jobs(ray_cluster)
    sid = f"wrapper-{uuid.uuid4().hex[:6]}"
    cmd = f"{sys.executable} -c \"print('hello from the job')\""
    jobs.submit(sid, cmd, num_cpus=0.5)
    jobs.submit(sid, cmd, num_cpus=0.5)  # a restart asking again gets the same job
    assert [j.submission_id for j in jobs.list(prefix=sid)] == [sid]
    with pytest.raises(ValueError, match="already exists with another command"):
        jobs.submit(sid, "echo other")
    assert jobs.wait(sid, timeout=120, poll=0.3).status == "SUCCEEDED"
    assert "hello from the job" in jobs.logs_tail(sid)
    sleeper = f"sleeper-{uuid.uuid4().hex[:6]}"
    jobs.submit(sleeper, f"{sys.executable} -c \"import time; time.sleep(300)\"", num_cpus=0.5)
    jobs.stop(sleeper)
    assert jobs.wait(sleeper, timeout=60, poll=0.3).status == "STOPPED"
    assert jobs.info("no-such-job") is None
    with pytest.raises(ConnectionError,
                       match=r"cannot reach the Ray cluster at http://127.0.0.1:9: start one with `make ray-up` or set RAY_ADDRESS"):
        Jobs("http://127.0.0.1:9")


def test_a_job_and_its_ray_workers_run_the_submitters_code_not_the_installed_package(ray_cluster):
    """Jobs ship the submitting linearsr package: `python -m linearsr` in the job and a Ray
    worker it starts with a runtime env of its own (as Ray Train's workers have) both import
    the shipped copy, not this checkout's editable install."""
    jobs = Jobs(ray_cluster)
    sid = f"ship-{uuid.uuid4().hex[:6]}"
    probe = textwrap.dedent("""
        import ray, linearsr
        @ray.remote(num_cpus=0, runtime_env={"env_vars": {"LINEARSR_PROBE": "1"}})
        def where():
            import linearsr.model.network
            return linearsr.model.network.__file__
        ray.init()
        print("DRIVER", linearsr.__file__)
        print("WORKER", ray.get(where.remote()))
    """)
    jobs.submit(sid, f"{command('--help')} > /dev/null && python -c {shlex.quote(probe)}", num_cpus=0)
    info = jobs.wait(sid, timeout=180, poll=0.5)
    logs = jobs.logs_tail(sid, 50)
    assert info.status == "SUCCEEDED", logs
    paths = dict(line.split(" ", 1) for line in logs.splitlines() if line.startswith(("DRIVER ", "WORKER ")))
    assert set(paths) == {"DRIVER", "WORKER"}, logs
    for who, path in paths.items():
        assert not path.startswith(REPO), f"the {who} imported the installed linearsr ({path})"
    with open(paths["WORKER"]) as shipped, open(os.path.join(REPO, "model", "network.py")) as ours:
        assert shipped.read() == ours.read()


def _windows(run, node_ids):
    return [(a["start"], a["end"]) for a in (read_json(join(node_dir(run, i), "args.json")) for i in node_ids)]


def _overlap(windows) -> bool:
    return max(s for s, _ in windows) < min(e for _, e in windows)


def test_the_knee_stops_the_pretrain_and_the_tree_runs_level_by_level_into_a_bundle(ray_cluster, tmp_path, fake_export):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = make_pretrain_run(str(tmp_path / f"knee-{uuid.uuid4().hex[:6]}"), tmp_path, plan={"barrier": True},
                            esgf={"experts": {"init": "per_interval"}})
    jobs = Jobs(ray_cluster)
    pretrain = f"pretrain-{uuid.uuid4().hex[:6]}"
    jobs.submit(pretrain, f"{sys.executable} -c \"import time; time.sleep(300)\"", num_cpus=0.5)

    assert main(["analyze", run, "--watch", "--pretrain-job", pretrain, "--ray-address", ray_cluster]) == 0
    d = read_json(join(run, "analysis", "decision.json"))
    assert d["method"] == "knee" and d["diverged_at"] is None
    assert jobs.wait(pretrain, timeout=60, poll=0.3).status == "STOPPED"  # E in ESGF: stopped at the knee
    state = read_json(join(run, "analysis", "state.json"))
    stop = state["pretrain_stopped"]
    assert stop["job"] == pretrain and stop["kind"] == "knee" and stop["last_step"] == 3000
    assert f"the knee is confirmed at step {d['confirmed_at']}" in stop["reason"]
    acc = EventAccumulator(join(run, "analysis", "tb", "stop"))
    acc.Reload()
    assert {e.step for e in acc.Scalars("loss/val_loss")} == {3000}
    assert any("the knee checkpoint was trained by code 0123456789ab" in e["event"] for e in state["events"])

    # level 1 from the pretrain checkpoint best for each half (init = "per_interval"), in parallel
    l1 = [read_json(join(node_dir(run, i), "args.json")) for i in ("L1-0", "L1-1")]
    assert [a["init"] for a in l1] == [d["intervals"][k]["checkpoint"] for k in ("-inf,0", "0,inf")]
    assert l1[0]["init"] != l1[1]["init"]  # the noisy half flattens later: its own, later checkpoint
    assert [a["interval"] for a in l1] == ["-inf,0", "0,inf"] and "run.steps=30" in l1[0]["overrides"]
    # level 2: each leaf from its parent's best checkpoint (step 20), all four at once, after level 1
    for i, node in enumerate(TREE[2]):
        args = read_json(join(node_dir(run, node.id), "args.json"))
        assert args["init"] == join(node_dir(run, node.parent_id), "checkpoints", "checkpoint_000020")
        assert args["interval"] == LEAVES[i]
    assert _overlap(_windows(run, ["L1-0", "L1-1"])) and _overlap(_windows(run, [n.id for n in TREE[2]]))
    assert max(e for _, e in _windows(run, ["L1-0", "L1-1"])) <= min(s for s, _ in _windows(run, [n.id for n in TREE[2]]))

    tree = state["tree"]
    assert tree["split"] == "mass" and tree["init"] == "per_interval" and len(tree["nodes"]) == 6
    assert tree["nodes"]["L2-3"]["parent"] == "L1-1" and tree["nodes"]["L1-0"]["parent"] == "decision"
    assert all(n["status"] == "succeeded" and n["best"]["step"] == 20 for n in tree["nodes"].values())
    manifest = read_manifest(join(run, "bundle"))
    assert [e["interval"] for e in manifest["experts"]] == [k.split(",") for k in LEAVES]
    assert [e["node"] for e in manifest["experts"]] == ["L2-0", "L2-1", "L2-2", "L2-3"]
    assert all(e["val_loss"] == 0.3 and e["weights_from"] == "ema" for e in manifest["experts"])
    assert [n["id"] for n in manifest["tree"]["nodes"]] == ["L1-0", "L1-1", "L2-0", "L2-1", "L2-2", "L2-3"]
    assert manifest["sampling"] == {"shift": 1.0} and len(load_bundle(join(run, "bundle")).experts) == 4

    # a restarted sidecar finds everything done and submits nothing
    before = {j.submission_id for j in run_jobs(jobs, run)}
    assert len(before) == 6
    assert main(["analyze", run, "--watch", "--ray-address", ray_cluster]) == 0
    assert {j.submission_id for j in run_jobs(jobs, run)} == before


def test_divergence_before_any_checkpoint_stops_the_pretrain_and_says_so(ray_cluster, tmp_path, caplog):
    run = make_pretrain_run(str(tmp_path / f"early-{uuid.uuid4().hex[:6]}"), tmp_path, n=12, nan_from=150)
    jobs = Jobs(ray_cluster)
    pretrain = f"pretrain-{uuid.uuid4().hex[:6]}"
    jobs.submit(pretrain, f"{sys.executable} -c \"import time; time.sleep(300)\"", num_cpus=0.5)
    assert main(["analyze", run, "--watch", "--pretrain-job", pretrain, "--ray-address", ray_cluster]) == 1
    assert jobs.wait(pretrain, timeout=60, poll=0.3).status == "STOPPED"
    state = read_json(join(run, "analysis", "state.json"))
    assert state["pretrain_stopped"]["kind"] == "divergence"
    assert "divergence began at step 200 before any usable checkpoint" in state["pretrain_stopped"]["reason"]
    assert "no usable checkpoint before divergence at step 200" in caplog.text
    assert not exists(join(run, "analysis", "decision.json")) and not run_jobs(jobs, run)


KILLER = textwrap.dedent('''
    import os, signal, sys
    from linearsr.cluster import jobs as J
    original, count = J.Jobs.submit, [0]
    def submit(self, *args, **kwargs):
        info = original(self, *args, **kwargs)
        count[0] += 1
        if count[0] == 4:  # Ray has L2-1's job (level 2's second); the sidecar dies before recording it
            os.kill(os.getpid(), signal.SIGKILL)
        return info
    J.Jobs.submit = submit
    from linearsr.main import main
    sys.exit(main(sys.argv[1:]))
''')


def test_sidecar_killed_inside_level_2_submits_only_the_missing_ones(ray_cluster, tmp_path, fake_export):
    run = make_pretrain_run(str(tmp_path / f"kill-{uuid.uuid4().hex[:6]}"), tmp_path)
    ckpt = join(run, "checkpoints", "checkpoint_001000")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(killer), "experts", run, "--from-checkpoint", ckpt,
                           "--ray-address", ray_cluster], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = read_json(join(run, "analysis", "state.json"))
    assert [len(state["jobs"].get(n.id, {}).get("attempts", [])) for n in TREE[2]] == [1, 1, 0, 0]
    assert state["jobs"]["L2-1"]["attempts"][-1]["status"] == "SUBMITTING"  # recorded before asking Ray
    assert state["jobs"]["L1-0"]["status"] == state["jobs"]["L1-1"]["status"] == "succeeded"
    jobs = Jobs(ray_cluster)
    assert len(run_jobs(jobs, run)) == 4

    assert main(["experts", run, "--ray-address", ray_cluster]) == 0  # the restart
    ids = sorted(j.submission_id for j in run_jobs(jobs, run))
    name = os.path.basename(run)
    token = ids[0][len(name) + 1:len(name) + 7]  # one decision: one token on every job
    assert ids == sorted(f"{name}-{token}-{i}-try-1" for i in ("L1-0", "L1-1", "L2-0", "L2-1", "L2-2", "L2-3"))
    assert exists(join(run, "bundle", "manifest.json"))

    # even with its state file lost, a sidecar asks Ray first and submits nothing twice
    os.remove(join(run, "analysis", "state.json"))
    assert main(["experts", run, "--ray-address", ray_cluster]) == 0
    assert sorted(j.submission_id for j in run_jobs(jobs, run)) == ids


def test_failed_expert_is_retried_and_a_permanent_failure_names_its_interval(ray_cluster, tmp_path, fake_export, caplog):
    plan = {LEAVES[1]: "fail_once", LEAVES[2]: "fail"}
    run = make_pretrain_run(str(tmp_path / f"fail-{uuid.uuid4().hex[:6]}"), tmp_path, plan=plan)
    ckpt = join(run, "checkpoints", "checkpoint_001000")
    assert main(["experts", run, "--from-checkpoint", ckpt, "--ray-address", ray_cluster]) == 1

    state = read_json(join(run, "analysis", "state.json"))
    jobs = state["jobs"]
    assert [a["status"] for a in jobs["L2-1"]["attempts"]] == ["FAILED", "SUCCEEDED"]
    assert [a["status"] for a in jobs["L2-2"]["attempts"]] == ["FAILED", "FAILED"]
    assert f"injected failure for interval {LEAVES[2]}" in jobs["L2-2"]["attempts"][-1]["log_tail"]
    assert jobs["L2-0"]["status"] == jobs["L2-3"]["status"] == "succeeded"
    assert state["bundle"]["status"] == "failed" and state["bundle"]["failed"] == [LEAVES[2]]
    assert f"interval {LEAVES[2]}" in state["bundle"]["error"] and state["tree"]["nodes"]["L2-2"]["status"] == "failed"
    assert "no bundle written" in caplog.text and f"interval {LEAVES[2]}" in caplog.text
    assert f"`linearsr experts {run} --retry-failed` gives L2-2 [0, 1.35) another round" in caplog.text
    assert not exists(join(run, "bundle", "manifest.json"))

    # the operator fixes the cause and gives the failed node another round
    cmd = read_json(join(run, "config.json"))["esgf"]["experts"]["command"].split()[-1]
    with open(cmd, "w") as f:
        f.write(fake_trainer())
    assert main(["experts", run, "--retry-failed", "--ray-address", ray_cluster]) == 0
    state = read_json(join(run, "analysis", "state.json"))
    assert [a["submission_id"].rsplit("-", 1)[-1] for a in state["jobs"]["L2-2"]["attempts"]] == ["1", "2", "3"]
    assert len(state["jobs"]["L1-0"]["attempts"]) == 1  # the finished level is kept
    assert len(read_manifest(join(run, "bundle"))["experts"]) == 4


def test_s3_run_dir_works_like_a_local_folder(ray_cluster, tmp_path, s3_bucket, fake_export):
    """Also the optional level 0 (a full-range fine-tune first: level 1 starts from its best) and
    the equal-compute control beside the tree (as many steps as its 7 nodes together)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


    run = make_pretrain_run(f"{s3_bucket}/runs/s3run-{uuid.uuid4().hex[:6]}", tmp_path, n=30, steps=3000,
                            esgf={"experts": {"full_range_first": True, "control": True,
                                              "control_overrides": ["cluster.num_workers=2", "data.batch_size=4"]}})
    # a partly written last line (object stores are rewritten whole, but a reader may race a writer)
    metrics = join(run, "metrics.jsonl")
    storage.write_bytes_atomic(metrics, storage.read_bytes(metrics) + b'{"step": 3100, "val_lo')

    assert main(["analyze", run, "--watch", "--ray-address", ray_cluster]) == 0
    d = read_json(join(run, "analysis", "decision.json"))
    assert d["method"] == "knee" and d["checkpoint"].startswith(run)
    assert storage.read_bytes(join(run, "analysis", "curve.png"))[:4] == b"\x89PNG"
    full = node_dir(run, "L0-0")
    assert read_json(join(full, "args.json"))["init"] == d["checkpoint"]
    for node in TREE[1]:  # each half from the full-range run's best (step 20)
        assert read_json(join(node_dir(run, node.id), "args.json"))["init"] == join(full, "checkpoints", "checkpoint_000020")
    state = read_json(join(run, "analysis", "state.json"))
    assert state["jobs"]["L0-0"]["status"] == "succeeded"
    control = state["tree"]["control"]
    assert control["status"] == "succeeded" and control["steps"] == 30 * 7 and control["best"]["step"] == 20
    args = read_json(join(run, "experts", "control_-inf_inf", "args.json"))
    assert args["init"] == d["checkpoint"] and args["interval"] == "-inf,inf"
    assert args["overrides"][0] == "run.steps=210" and args["overrides"][-2:] == ["cluster.num_workers=2", "data.batch_size=4"]
    assert _overlap([(args["start"], args["end"]), *_windows(run, ["L0-0"])])  # beside the tree, from the start
    manifest = read_json(join(run, "bundle", "manifest.json"))
    assert len(manifest["experts"]) == 4 and "control" not in {e["node"] for e in manifest["experts"]}
    for e in manifest["experts"]:
        assert exists(join(run, "bundle", e["weights"]))
    assert any(f.endswith(".esgf") for f in storage.ls(join(run, "tb")))
    local_tb = tmp_path / "tb"
    storage.download_dir(join(run, "tb"), str(local_tb))
    acc = EventAccumulator(str(local_tb))
    acc.Reload()
    assert [e.step for e in acc.Scalars("esgf/checkpoint_step")] == [d["checkpoint_step"]]
    assert storage.find(join(run, "analysis", "tb", "knee"))
