"""`linearsr analyze` one-shot and the decision's outputs (decision.json, curve.png, TensorBoard),
without a Ray cluster."""

import json
import math
import os
import random

import pytest

from linearsr.ckpt_analysis.sidecar import Sidecar
from linearsr.core.storage import read_json, write_json
from linearsr.main import main
from linearsr.model.flow import FlowConfig
from linearsr.trainer.checkpoint import MARKER
from linearsr.trainer.rundir import MetricsWriter

LEAVES = [iv.key for iv in FlowConfig().intervals()]  # a run config without [flow]: the default tree


def make_run(path, n, noise=0.005, nan_from=None, config=None):
    rng = random.Random(0)
    w = MetricsWriter(str(path))
    for i in range(n):
        step = 100 * (i + 1)
        v = 0.5 * math.exp(-step / 600) + 0.1 + rng.gauss(0, noise)
        if nan_from is not None and step >= nan_from:
            v = math.nan
        ckpt = None
        if i % 2:
            ckpt = os.path.join(str(path), "checkpoints", f"checkpoint_{step:06d}")
            write_json(os.path.join(ckpt, MARKER), {"files": []})  # the trainer's completeness marker
        w.append({"step": step, "samples": 8 * step, "wall_time": float(step), "train_loss": v, "val_loss": v,
                  "val_loss_by_interval": dict(zip(LEAVES, (2 * v, v, v / 2, v / 4))),
                  "lr": 1e-3, "grad_norm": 1.0, "samples_per_s": 50.0, "data_skips": {}, "checkpoint": ckpt})
    write_json(os.path.join(str(path), "config.json"),
               config if config is not None else {"run": {"name": "t", "steps": 6000}, "validation": {"every": 100}})
    return str(path)


def test_one_shot_says_why_there_is_no_decision_yet(tmp_path, capsys):
    run = make_run(tmp_path / "short", 4)
    assert main(["analyze", run]) == 0
    out = capsys.readouterr().out
    assert "no knee yet: 4 validations, need ≥ 6" in out
    assert not os.path.exists(os.path.join(run, "analysis", "decision.json"))  # one-shot never decides


def test_one_shot_tolerates_a_partly_written_last_line(tmp_path, capsys):
    run = make_run(tmp_path / "torn", 30)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3100, "val_loss": 0.1, "checkp')
    assert main(["analyze", run, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["validations"] == 30 and s["last_step"] == 3000
    assert s["decided"] is False and s["would_decide"]["method"] == "knee"
    assert s["would_decide"]["checkpoint_step"] <= s["knee_step"]
    with open(os.path.join(run, "analysis", "curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_finished_flag_and_step_budget_let_a_still_falling_run_decide(tmp_path, capsys):
    run = make_run(tmp_path / "budget", 12, noise=0.0)
    assert main(["analyze", run]) == 0
    assert "no knee yet at step 1200" in capsys.readouterr().out
    assert main(["analyze", run, "--finished", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["would_decide"] is not None
    # the trainer's step budget (run.steps) is used up: the run has ended
    run2 = make_run(tmp_path / "ended", 12, noise=0.0, config={"run": {"steps": 1200}, "validation": {"every": 100}})
    assert Sidecar(run2).run_finished(Sidecar(run2).run.read_metrics())


def test_bad_run_dir_and_bad_esgf_config_are_one_line_errors(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "config.json does not exist" in err and "Traceback" not in err
    run = make_run(tmp_path / "bad", 3, config={"esgf": {"knee": {"smoothing": "gauss"}}})
    assert main(["analyze", run]) == 1
    assert "esgf.knee.smoothing" in capsys.readouterr().err


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_decision_is_written_with_picture_and_tensorboard_record(tmp_path):
    run = make_run(tmp_path / "tb", 30, nan_from=2600)
    sidecar = Sidecar(run)
    analysis = sidecar.analyze()
    assert analysis.decision is not None
    d = sidecar.record_decision(analysis)
    on_disk = read_json(os.path.join(run, "analysis", "decision.json"))
    assert on_disk["checkpoint"] == d["checkpoint"] and on_disk["diverged_at"] == 2600
    assert d["checkpoint_step"] < 2600
    state = read_json(os.path.join(run, "analysis", "state.json"))
    assert state["decision"]["checkpoint"] == d["checkpoint"]
    assert os.path.getsize(os.path.join(run, "analysis", "curve.png")) > 10_000

    acc = _events(os.path.join(run, "tb"))
    assert "esgf/curve" in acc.Tags()["images"]
    text = acc.Tensors("esgf/decision/text_summary")[0].tensor_proto.string_val[0].decode()
    assert d["checkpoint"] in text and "best_before_divergence" in text
    # the onset as a vertical segment on the val-loss chart (a marker run beside the trainer's)
    assert [(e.step, e.value) for e in acc.Scalars("esgf/diverged")] == [(2600, 1.0)]
    assert {e.step for e in _events(os.path.join(run, "analysis", "tb", "diverged")).Scalars("loss/val_loss")} == {2600}


def test_the_knee_and_the_stop_are_marked_on_the_val_loss_chart(tmp_path):
    from linearsr.ckpt_analysis.report import log_stop

    run = make_run(tmp_path / "knee", 40)
    sidecar = Sidecar(run)
    d = sidecar.record_decision(sidecar.analyze())
    assert d["method"] == "knee"
    marker = _events(os.path.join(run, "analysis", "tb", "knee")).Scalars("loss/val_loss")
    vals = [r["val_loss"] for r in sidecar.run.read_metrics()]
    assert [(e.step, e.value) for e in marker] == [(d["knee_step"], pytest.approx(min(vals), rel=1e-6)),
                                                   (d["knee_step"], pytest.approx(max(vals), rel=1e-6))]
    text = _events(os.path.join(run, "tb")).Tensors("esgf/decision/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"knee step: {d['knee_step']}, confirmed at step {d['confirmed_at']}" in text and "| -inf,-1.35 |" in text
    log_stop(sidecar.run, {"job": "JOB", "kind": "knee", "reason": "the knee is confirmed", "last_step": 3200, "at": 0})
    assert {e.step for e in _events(os.path.join(run, "analysis", "tb", "stop")).Scalars("loss/val_loss")} == {3200}
    stop = _events(os.path.join(run, "tb")).Tensors("esgf/stop/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "pretrain stopped** (knee) after step 3200" in stop


def test_curve_png_shows_raw_smoothed_and_the_threshold(tmp_path):
    from linearsr.ckpt_analysis.report import plot_curve

    run = make_run(tmp_path / "png", 40)
    fig = plot_curve(Sidecar(run).analyze())
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:4] == ["val loss (raw)", "smoothed (no lag)", "knee threshold", "knee"]
    assert "rule fired (pretrain stopped)" in labels and any(s.startswith("chosen checkpoint") for s in labels)


@pytest.mark.parametrize("argv", [["experts", "RUN"], ["experts", "RUN", "--from-checkpoint", "RUN/nope"]])
def test_experts_without_a_usable_checkpoint_is_a_clear_error(tmp_path, capsys, argv):
    run = make_run(tmp_path / "ex", 4)
    assert main([a.replace("RUN", run) for a in argv]) == 1
    err = capsys.readouterr().err
    assert ("has no decision yet" in err) or ("does not exist" in err)
    assert not os.path.exists(os.path.join(run, "analysis", "decision.json"))


def test_a_checkpoint_without_its_completeness_marker_is_never_chosen(tmp_path):
    run = make_run(tmp_path / "partial", 30)
    first = Sidecar(run).analyze().decision
    os.remove(os.path.join(first["checkpoint"], MARKER))  # its save was interrupted
    d = Sidecar(run).analyze().decision
    assert d["checkpoint_step"] == first["checkpoint_step"] + 200  # the next one at or below the threshold
    assert f"missing or incomplete on storage: steps [{first['checkpoint_step']}]" in d["reason"]


def test_unreachable_ray_cluster_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = make_run(tmp_path / "noray", 30)
    dead = "http://127.0.0.1:9"
    message = f"cannot reach the Ray cluster at {dead}: start one with `make ray-up` or set RAY_ADDRESS"
    assert main(["analyze", run, "--watch", "--pretrain-job", "pre-1", "--ray-address", dead]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"linearsr analyze: error: {message}"
    ckpt = os.path.join(run, "checkpoints", "checkpoint_000200")
    assert main(["experts", run, "--from-checkpoint", ckpt, "--ray-address", dead]) == 1
    assert capsys.readouterr().err.strip() == f"linearsr experts: error: {message}"
    assert not os.path.exists(os.path.join(run, "analysis"))


def test_no_cluster_given_says_how_to_get_one(tmp_path, monkeypatch):
    from linearsr.cluster.jobs import resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConnectionError, match=r"no Ray cluster given: start one with `make ray-up` or set RAY_ADDRESS"):
        resolve_address(None, state_dir=str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert resolve_address(None, state_dir=str(tmp_path)) == "http://10.0.0.5:8265"
    assert resolve_address("http://127.0.0.1:1234/", state_dir=str(tmp_path)) == "http://127.0.0.1:1234"


def test_a_relative_run_dir_reaches_the_expert_jobs_as_an_absolute_path(tmp_path, monkeypatch):
    from linearsr.ckpt_analysis.experts import entrypoint
    from linearsr.ckpt_analysis.tree import node_spec

    monkeypatch.chdir(tmp_path)
    make_run("rel", 3)
    sidecar = Sidecar("rel")  # as `make sidecar RUN=runs/demo` passes it
    spec = node_spec(sidecar.run, sidecar.flow.tree()[2][2], "rel/checkpoints/checkpoint_000200", 30, None)
    cmd = entrypoint(spec, sidecar.run, sidecar.cfg)
    assert f"--config {tmp_path}/rel/config.json --run {tmp_path}/rel/experts/L2-2_0_1.35" in cmd
    assert cmd.endswith("--t-interval=0,1.35 run.steps=30") and cmd.startswith("python -m linearsr train ")


def test_expert_job_ids_name_the_decision():
    """A wiped and rerun run dir (new decision) must not adopt the old run's finished jobs on a
    long-lived Ray head; a restarted sidecar (same decision) must find its own jobs again."""
    from linearsr.ckpt_analysis.experts import decision_token, submission_id
    from linearsr.trainer.rundir import RunDir

    d1 = {"decided_at": "2026-11-26T08:00:00Z", "checkpoint": "runs/demo/checkpoints/checkpoint_000100"}
    d2 = {**d1, "decided_at": "2026-11-26T09:30:00Z"}
    assert decision_token(d1) == decision_token(dict(d1))
    assert decision_token(d1) != decision_token(d2)
    run = RunDir("runs/demo")
    assert submission_id(run, "expert-2", 1, decision_token(d1)) == f"demo-{decision_token(d1)}-expert-2-try-1"


def test_shared_workers_split_the_pretrains_gpus_and_keep_its_global_batch(tmp_path):
    from linearsr.ckpt_analysis.config import shared_workers
    from linearsr.ckpt_analysis.experts import entrypoint
    from linearsr.ckpt_analysis.tree import TreeRun, node_spec

    config = {"cluster": {"num_workers": 4}, "optim": {"grad_accum": 1}}
    assert [shared_workers(config, jobs) for jobs in (1, 2, 3, 4, 8)] == [(4, 1), (2, 2), (1, 4), (1, 4), (1, 4)]
    run = make_run(tmp_path / "share", 3, config={"run": {"steps": 1000}, "cluster": {"num_workers": 4},
                                                   "esgf": {"experts": {"share_workers": True, "steps": 50}}})
    sidecar = Sidecar(run)
    tree = TreeRun(sidecar.run, sidecar.config, sidecar.cfg, sidecar.flow, sidecar.state, None, 1)
    level1, level2 = sidecar.flow.tree()[1:]
    assert tree.workers(level1) == (2, 2) and tree.workers(level2) == (1, 4)  # base_x4: 2 + 2, then 1 each
    cmd = entrypoint(node_spec(sidecar.run, level2[0], "CKPT", 50, tree.workers(level2)), sidecar.run, sidecar.cfg)
    assert cmd.endswith("run.steps=50 cluster.num_workers=1 optim.grad_accum=4")
