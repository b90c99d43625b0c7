"""Checkpoint discovery, integrity (sizes + checksums), pins, retention and per-rank state
(no Ray, no DeepSpeed)."""

import logging
import math
import os

import pytest
import torch

from linearsr.core import storage
from linearsr.core.storage import write_json
from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer import zero


def fake_checkpoint(run: str, step: int, complete: bool = True, val_loss: float = 1.0) -> str:
    url = ckpt.url_of(run, step)
    write_json(f"{url}/{ckpt.META}", {"step": step, "val_loss": val_loss})
    os.makedirs(f"{url}/ds", exist_ok=True)
    with open(f"{url}/ds/mp_rank_00_model_states.pt", "wb") as f:
        f.write(b"weights of step %d" % step)
    if complete:
        ckpt.write_marker(url, ckpt.digest_files(url), step)
    return url


def test_names_sort_by_step_and_marker_decides_completeness(tmp_path):
    run = str(tmp_path / "run")
    assert ckpt.list_checkpoints(run) == [] and ckpt.latest_complete(run) is None
    for step in (100, 20, 40):
        fake_checkpoint(run, step, complete=step != 100)
    (tmp_path / "run" / "checkpoints" / "checkpoint_manager_snapshot.json").write_text("{}")
    found = ckpt.list_checkpoints(run)
    assert [(f.step, f.complete) for f in found] == [(20, True), (40, True), (100, False)]
    assert found[0].url.endswith("checkpoints/checkpoint_000020")


def test_resume_skips_an_interrupted_save_and_says_why(tmp_path, caplog):
    run = str(tmp_path / "run")
    fake_checkpoint(run, 20)
    partial = fake_checkpoint(run, 40, complete=False)
    with caplog.at_level(logging.WARNING):
        found = ckpt.latest_complete(run, remove_incomplete=True)
    assert found.step == 20
    assert "skipping checkpoint" in caplog.text and "checkpoint_000040" in caplog.text and "interrupted" in caplog.text
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint_000040").exists()
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ckpt.require_complete(partial)


def test_an_incomplete_checkpoint_is_refused_as_init(tmp_path):
    url = fake_checkpoint(str(tmp_path / "run"), 40, complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.require_complete(url)


def test_marker_is_only_written_when_every_file_arrived_whole(tmp_path):
    url = ckpt.url_of(str(tmp_path / "run"), 10)
    write_json(f"{url}/{ckpt.META}", {"step": 10})
    files = ckpt.digest_files(url)
    missing = {**files, "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": {"size": 5, "sha256": "0" * 64}}
    with pytest.raises(OSError, match="lacks ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        ckpt.write_marker(url, missing)
    short = {ckpt.META: {**files[ckpt.META], "size": files[ckpt.META]["size"] + 1}}
    with pytest.raises(OSError, match="bytes in storage"):
        ckpt.write_marker(url, short)
    assert not ckpt.is_complete(url)
    ckpt.write_marker(url, files, 10)
    assert ckpt.is_complete(url) and ckpt.read_marker(url)["files"][ckpt.META]["sha256"] == files[ckpt.META]["sha256"]


def test_a_file_changed_after_the_save_fails_verification(tmp_path):
    url = fake_checkpoint(str(tmp_path / "run"), 10)
    assert ckpt.fetch(url, str(tmp_path / "dl"))[1] == []
    with open(f"{url}/ds/mp_rank_00_model_states.pt", "r+b") as f:  # same size, other bytes: bit rot
        f.write(b"W")
    os.remove(f"{url}/{ckpt.META}")
    problems = ckpt.fetch(url, str(tmp_path / "dl"))[1]
    assert problems == ["ds/mp_rank_00_model_states.pt does not match its sha256 in COMPLETE", f"{ckpt.META} is missing"]
    ckpt.mark_corrupt(url, "; ".join(problems))
    assert not ckpt.is_complete(url)
    write_json(f"{url}/{ckpt.META}", {"step": 10})
    with pytest.raises(ValueError, match="failed verification"):
        ckpt.require_complete(url)


def test_resume_candidates_skip_corrupt_and_interrupted_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    for step in (10, 20, 30):
        fake_checkpoint(run, step)
    fake_checkpoint(run, 40, complete=False)
    ckpt.mark_corrupt(ckpt.url_of(run, 30), "ds/mp_rank_00_model_states.pt does not match its sha256")
    assert [f.step for f in ckpt.complete_newest_first(run, remove_incomplete=True)] == [20, 10]
    assert [f.step for f in ckpt.list_checkpoints(run)] == [10, 20, 30]  # the corrupt one stays for a look


def test_a_remote_checkpoint_is_fetched_only_for_the_files_a_rank_needs(tmp_path):
    files = ["meta.json", "latest", "ema.safetensors", "state_rank0.json", "state_rank1.json",
             "ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_10_mp_rank_00_optim_states.pt"]
    rank1 = [f for f in files if zero.rank_needs(f, 1, same_world=True)]
    assert rank1 == ["meta.json", "latest", "ema.safetensors", "state_rank1.json", "ds/mp_rank_00_model_states.pt",
                     "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # another world size: rank 0 consolidates every shard, the others read only meta.json
    assert [f for f in files if zero.rank_needs(f, 1, same_world=False)] == ["meta.json"]
    assert [f for f in files if zero.rank_needs(f, 0, same_world=False)] == [
        f for f in files if not f.startswith("state_rank")]


@pytest.mark.parametrize("losses, keep, deleted", [
    ([(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)], None, []),
    ([(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)], 2, [10]),  # 20 is the best: kept
    ([(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)], 1, [10, 30]),
    ([(10, 1.0), (20, math.nan), (30, math.inf)], 1, [20]),  # non-finite never counts as best
    ([(10, 2.0), (20, 3.0)], 5, []),
])
def test_retention_never_deletes_the_best_or_the_last_n(losses, keep, deleted):
    assert ckpt.to_delete(losses, keep) == deleted


def test_apply_retention_deletes_folders_but_never_a_pinned_one(tmp_path):
    run = str(tmp_path / "run")
    for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0), (40, 2.5), (50, 2.7)):
        fake_checkpoint(run, step, val_loss=loss)
    ckpt.pin(ckpt.url_of(run, 30), by=f"{run}/analysis/decision.json", why="the ESGF decision")
    ckpt.pin(ckpt.url_of(run, 30), by=f"{run}/analysis/decision.json", why="the ESGF decision")  # idempotent
    assert [p["why"] for p in ckpt.pins(ckpt.url_of(run, 30))] == ["the ESGF decision"]
    assert ckpt.apply_retention(run, keep=1) == [10, 40]
    assert [f.step for f in ckpt.list_checkpoints(run)] == [20, 30, 50]
    assert all(f.complete for f in ckpt.list_checkpoints(run))


def test_retention_removes_the_marker_before_the_files(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    for step in (10, 20):
        fake_checkpoint(run, step, val_loss=float(step))  # 10 is the best, 20 the last: make 10 deletable
    fake_checkpoint(run, 30, val_loss=0.5)
    order = []
    real_rm = storage.rm
    monkeypatch.setattr(storage, "rm", lambda url, recursive=False: (order.append(os.path.basename(url)), real_rm(url, recursive))[1])
    ckpt.apply_retention(run, keep=1)
    assert order[:2] == [ckpt.MARKER, "checkpoint_000010"] and order[2:4] == [ckpt.MARKER, "checkpoint_000020"]


def test_rank_state_round_trip_restores_the_random_streams():
    import json
    import random

    import numpy as np

    g = torch.Generator().manual_seed(123)
    torch.manual_seed(7)
    random.seed(5)
    np.random.seed(11)
    state = json.loads(json.dumps(ckpt.rank_state(g, {"step": 3})))  # as stored in state_rank<R>.json
    expected = (torch.rand(4, generator=g), torch.rand(4), random.random(), np.random.rand(3))
    g2 = torch.Generator().manual_seed(999)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    ckpt.restore_rank_state(state, g2)
    assert torch.equal(torch.rand(4, generator=g2), expected[0]) and torch.equal(torch.rand(4), expected[1])
    assert random.random() == expected[2] and state["step"] == 3
    assert np.array_equal(np.random.rand(3), expected[3])
