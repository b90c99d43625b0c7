"""Bad input at the edges, through the real `linearsr` command: a config with a wrong type, an
unknown key or an impossible value, shards or a run dir without credentials or in a bucket that
does not exist, an unreachable Ray cluster. Each must end with exit code 1 and ONE stderr line
`linearsr <cmd>: error: ...` naming the thing and the fix, with nothing written.

Already covered elsewhere (not repeated here): overrides with bad keys/values/syntax for
`train` (tests/unit/test_config_cli.py), missing local shards, a run dir in a missing bucket for
`train` (test_train.py), `shards info` without credentials and an unreachable S3 endpoint
(test_data_s3.py), an unreachable cluster for `experts` and a bad [esgf] table
(tests/unit/test_sidecar.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from linearsr.core import storage
from linearsr.core.storage import write_json
from linearsr.main import main

pytestmark = pytest.mark.integration

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cpu_tiny.toml")
DEAD_RAY = "http://127.0.0.1:9"


def one_line_error(capsys, cmd: str, *argv: str) -> str:
    """Run `linearsr CMD ARGV...`; assert exit 1 and exactly one stderr line `linearsr CMD: error: ...`."""
    code = main([cmd, *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"linearsr {cmd}: error: "), err
    return lines[0]


def nothing_under(url: str) -> bool:
    if "://" not in url:
        return not os.path.exists(url)
    import s3fs  # the test's own look, with the local server's credentials whatever the environment says

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], key="testing", secret="testing",
                           skip_instance_cache=True)
    return not fs.find(url[len("s3://"):])


@pytest.fixture
def no_credentials(monkeypatch):
    """An environment where no AWS credentials can be found (and fresh clients that look again)."""
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    monkeypatch.setattr(storage, "_filesystems", {})
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return {k: v for k, v in os.environ.items()}


@pytest.mark.parametrize("toml, names", [
    ('[run]\nsteps = "ten"\n', ["'run.steps' must be an integer", "'ten'"]),
    ("[optim]\nlearning_rate = 1e-3\n", ["unknown config key 'optim.learning_rate'", "known keys in 'optim'", "lr"]),
    ("[trainer]\nsteps = 3\n", ["unknown config key 'trainer'", "known keys:"]),
    ("[data]\ncrop = 30\n", ["data.crop must be a positive multiple of data.scale=4, got 30"]),
    ("[checkpoint]\nevery = 7\n[validation]\nevery = 5\nimage_every = 0\n",
     ["checkpoint.every=7 must be a multiple of validation.every=5"]),
    ("[data]\nshards = 's3://AKIAX:secret@bucket/shards'\n", ["data.shards must not contain credentials",
                                                              "AWS_ACCESS_KEY_ID"]),
    ("[run\nsteps = 3\n", ["is not valid TOML", "line 1"]),
])
@pytest.mark.parametrize("cmd", ["train", "submit"])
def test_bad_config_file_is_one_line_naming_the_key(capsys, tmp_path, toml, names, cmd):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    run = tmp_path / "run"
    extra = ["--address", DEAD_RAY] if cmd == "submit" else []  # the config is checked before the cluster
    line = one_line_error(capsys, cmd, "--config", str(path), "--run", str(run), *extra)
    assert all(n in line for n in names), line
    assert "AKIAX" not in line  # a rejected URL with credentials is not echoed
    assert nothing_under(str(run))


@pytest.mark.parametrize("cmd", ["train", "submit", "analyze --watch"])
def test_unreachable_ray_cluster_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_shards, cmd):
    run = str(tmp_path / "run")
    if cmd == "train":
        line = one_line_error(capsys, "train", "--config", TINY, f"data.shards={tiny_shards}", "--address",
                              "127.0.0.1:9", "--run", run)
        assert "cannot reach the Ray cluster at 127.0.0.1:9" in line and "make ray-up" in line
    elif cmd == "submit":
        line = one_line_error(capsys, "submit", "--config", TINY, f"data.shards={tiny_shards}", "--address", DEAD_RAY,
                              "--run", run)
        assert f"cannot reach the Ray cluster at {DEAD_RAY}: start one with `make ray-up` or set RAY_ADDRESS" in line
    else:
        write_json(os.path.join(run, "config.json"), {"run": {"name": "r", "steps": 100}})  # a run to watch
        line = one_line_error(capsys, "analyze", run, "--watch", "--pretrain-job", "pre-1", "--ray-address", DEAD_RAY)
        assert f"cannot reach the Ray cluster at {DEAD_RAY}" in line
        assert sorted(os.listdir(run)) == ["config.json"]  # no analysis/ written
        return
    assert nothing_under(run)


def test_shards_without_credentials_are_one_line(capsys, tmp_path, s3_bucket, tiny_shards, no_credentials):
    shards = f"{s3_bucket}/shards"
    run = str(tmp_path / "run")
    line = one_line_error(capsys, "train", "--config", TINY, f"data.shards={shards}", "--run", run)
    assert f"read {shards}/manifest.json: no AWS credentials found; set AWS_ACCESS_KEY_ID and " \
           "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment" in line
    assert nothing_under(run)


def test_run_dir_without_credentials_is_one_line_in_a_fresh_process(tmp_path, s3_bucket, tiny_shards, no_credentials):
    """As its own process: no log line of any library may join the error on stderr."""
    run = f"{s3_bucket}/runs/x"
    proc = subprocess.run([sys.executable, "-m", "linearsr", "train", "--config", TINY, f"data.shards={tiny_shards}",
                           "--run", run], env=no_credentials, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"linearsr train: error: write {run}/config.json: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment (for the local server: `. runs/s3/env`)"], proc.stderr
    assert proc.stdout == ""
    line_analyze = subprocess.run([sys.executable, "-m", "linearsr", "analyze", run], env=no_credentials,
                                  capture_output=True, text=True, timeout=120).stderr.strip().splitlines()
    assert line_analyze == [f"linearsr analyze: error: read {run}/config.json: no AWS credentials found; set "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment (for the "
                            "local server: `. runs/s3/env`)"]
    assert nothing_under(run)


@pytest.mark.parametrize("what", ["shards", "run dir"])
def test_submit_to_a_missing_bucket_is_one_line_before_any_job(capsys, tmp_path, ray_cluster, s3_bucket, tiny_shards,
                                                               what):
    from linearsr.cluster.jobs import Jobs

    before = {j.submission_id for j in Jobs(ray_cluster).list()}
    if what == "shards":
        run = str(tmp_path / "run")
        line = one_line_error(capsys, "submit", "--address", ray_cluster, "--config", TINY,
                              "data.shards=s3://no-such-bucket-5e2/shards", "--run", run)
        assert "no manifest.json under shard root s3://no-such-bucket-5e2/shards (The specified bucket does not " \
               "exist): build shards there with `linearsr shards build SRC s3://no-such-bucket-5e2/shards`" in line
        assert nothing_under(run)
    else:
        line = one_line_error(capsys, "submit", "--address", ray_cluster, "--config", TINY,
                              f"data.shards={tiny_shards}", "--run", "s3://no-such-bucket-5e2/runs/x")
        assert line.endswith("cannot write the run dir s3://no-such-bucket-5e2/runs/x: its bucket or parent does not exist")
    assert {j.submission_id for j in Jobs(ray_cluster).list()} == before  # no job was submitted
