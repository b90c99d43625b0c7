"""`linearsr train` / `linearsr submit` refuse bad input with one line naming the problem, before
anything is written or any Ray process starts."""

import os

import pytest

from linearsr.main import main

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "cpu_tiny.toml")


@pytest.fixture
def shards(tmp_path):
    """A shard root with a manifest is all these checks look at (no training happens)."""
    root = tmp_path / "shards"
    root.mkdir()
    from linearsr.data.shards import FORMAT

    (root / "manifest.json").write_text('{"format": "%s", "splits": {"train": {"samples": 1, "bytes": 1, '
                                        '"shards": []}, "val": {"samples": 0, "bytes": 0, "shards": []}}}' % FORMAT)
    return str(root)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("args, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["run.steps=ten"], "config key 'run.steps' must be an integer"),
    (["checkpoint.every=7"], "checkpoint.every=7 must be a multiple of validation.every"),
    (["--t-interval=5,1"], "log-SNR interval needs lo < hi"),
    (["optim.lr"], "override 'optim.lr' is not KEY=VALUE"),
    # the sidecar's table is checked at launch, not hours later when the knee is found
    (["esgf.knee.windw=3"], "unknown config key 'esgf.knee.windw'"),
    (["esgf.experts.overrides=['cluster.num_worker=1']"],
     "esgf.experts.overrides: unknown config key 'cluster.num_worker'"),
    (["esgf.experts.overrides=['optim.lr=-1']"], "esgf.experts.overrides: optim.lr must be > 0"),
    (["flow.bisection_depth=0"], "flow.bisection_depth must be >= 1: it is the depth of the ESGF expert tree"),
    (["flow.split=fixed", "flow.split_points=[-1, 0, 9]"], "flow.split_points [9.0] lie outside the range"),
    (["esgf.experts.init=parents"], "'esgf.experts.init' is 'parents'; choose one of 'knee', 'per_interval'"),
    (["esgf.knee.tolerance=0"], "esgf.knee.tolerance must lie in (0, 1)"),
    (["esgf.experts.control_overrides=['data.batch_size=0']"], "esgf.experts.control_overrides: data.batch_size"),
])
def test_bad_config_is_one_line_naming_the_key(capsys, tmp_path, args, message):
    code, err = run_cli(capsys, "train", "--config", TINY, *args, "--run", str(tmp_path / "run"))
    assert code == 1 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_missing_shards_are_named_with_the_fix(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--config", TINY, f"data.shards={tmp_path}/none", "--run", str(tmp_path / "run"))
    assert code == 1 and f"{tmp_path}/none" in err and "linearsr shards build" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:9", "cannot reach the Ray cluster at 127.0.0.1:9"),
    ("http://127.0.0.1:9", "is a Jobs API (dashboard) URL; submit with `linearsr submit"),
])
def test_unreachable_ray_address_writes_nothing(capsys, tmp_path, shards, address, message):
    code, err = run_cli(capsys, "train", "--config", TINY, f"data.shards={shards}", "--address", address,
                        "--run", str(tmp_path / "run"))
    assert code == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_init_must_be_a_complete_checkpoint(capsys, tmp_path, shards):
    partial = tmp_path / "old" / "checkpoints" / "checkpoint_000040"
    partial.mkdir(parents=True)
    (partial / "meta.json").write_text('{"step": 40}')
    code, err = run_cli(capsys, "train", "--config", TINY, f"data.shards={shards}", "--init", str(partial),
                        "--address", "127.0.0.1:9", "--run", str(tmp_path / "run"))
    assert code == 1 and "cannot reach" in err  # the address is checked first ...
    code, err = run_cli(capsys, "train", "--config", TINY, f"data.shards={shards}", "--init", str(partial),
                        "--run", str(tmp_path / "run"))
    assert code == 1 and "is incomplete (no COMPLETE marker" in err  # ... then the init checkpoint, before Ray
    assert not (tmp_path / "run").exists()


def test_submit_to_an_unreachable_cluster_writes_nothing(capsys, tmp_path, shards):
    code, err = run_cli(capsys, "submit", "--address", "http://127.0.0.1:9", "--config", TINY,
                        f"data.shards={shards}", "--run", str(tmp_path / "run"))
    assert code == 1 and "cannot reach the Ray cluster at http://127.0.0.1:9" in err, err
    assert not (tmp_path / "run").exists()


def test_local_paths_are_made_absolute_for_the_workers(monkeypatch, tmp_path):
    from linearsr.cluster.launch import absolute_paths
    from linearsr.trainer.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(TINY, ["run.url=runs/x", "finetune.init=runs/y/checkpoints/checkpoint_000010",
                                            "faults.die_once_marker=died"]))
    assert cfg.run_url == str(tmp_path / "runs" / "x") and cfg.data.shards == str(tmp_path / "runs" / "data" / "shards")
    assert cfg.finetune.init == str(tmp_path / "runs/y/checkpoints/checkpoint_000010")
    assert cfg.faults.die_once_marker == str(tmp_path / "died")
    remote = absolute_paths(load_config(TINY, ["run.url=s3://b/runs/x/", "data.shards=s3://b/shards"]))
    assert (remote.run_url, remote.data.shards) == ("s3://b/runs/x", "s3://b/shards")


def test_failed_training_names_the_rank_that_failed_first():
    from linearsr.cluster.launch import _root_cause

    class WorkerGroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    broken_pipe = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:12493")
    bad_data = ValueError("training data: 30 of 200 samples skipped (15% > data.max_skip_fraction=0.05)")
    assert _root_cause(WorkerGroupError({0: broken_pipe, 1: bad_data})) == f"rank 1: ValueError: {bad_data}"
    assert _root_cause(WorkerGroupError({0: broken_pipe})).startswith("rank 0: RuntimeError: [gloo")


def test_verbose_flag_works_before_the_command_too(capsys, tmp_path):
    code, err = run_cli(capsys, "-v", "train", "--config", TINY, "optim.lrr=1", "--run", str(tmp_path / "run"))
    assert code == 1 and "unknown config key 'optim.lrr'" in err and "unknown command" not in err
