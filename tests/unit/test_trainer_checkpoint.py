"""Checkpoint discovery, completeness, retention and per-rank state (no Ray, no DeepSpeed)."""

import logging
import math

import pytest
import torch

from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer.rundir import write_json


def fake_checkpoint(run: str, step: int, complete: bool = True, val_loss: float = 1.0) -> str:
    url = ckpt.url_of(run, step)
    write_json(f"{url}/{ckpt.META}", {"step": step, "val_loss": val_loss})
    if complete:
        ckpt.write_marker(url, [ckpt.META])
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


def test_marker_is_only_written_when_every_file_arrived(tmp_path):
    url = ckpt.url_of(str(tmp_path / "run"), 10)
    write_json(f"{url}/{ckpt.META}", {"step": 10})
    with pytest.raises(OSError, match="lacks 1 file"):
        ckpt.write_marker(url, [ckpt.META, "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    assert not ckpt.is_complete(url)


@pytest.mark.parametrize("losses, keep, deleted", [
    ([(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)], None, []),
    ([(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)], 2, [10]),  # 20 is the best: kept
    ([(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)], 1, [10, 30]),
    ([(10, 1.0), (20, math.nan), (30, math.inf)], 1, [20]),  # non-finite never counts as best
    ([(10, 2.0), (20, 3.0)], 5, []),
])
def test_retention_never_deletes_the_best_or_the_last_n(losses, keep, deleted):
    assert ckpt.to_delete(losses, keep) == deleted


def test_apply_retention_deletes_folders(tmp_path):
    run = str(tmp_path / "run")
    for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0), (40, 2.5)):
        fake_checkpoint(run, step, val_loss=loss)
    assert ckpt.apply_retention(run, keep=1) == [10, 30]
    assert [f.step for f in ckpt.list_checkpoints(run)] == [20, 40]


def test_rank_state_round_trip_restores_the_random_streams():
    import json
    import random

    g = torch.Generator().manual_seed(123)
    torch.manual_seed(7)
    random.seed(5)
    state = json.loads(json.dumps(ckpt.rank_state(g, {"step": 3})))  # as stored in state_rank<R>.json
    expected = (torch.rand(4, generator=g), torch.rand(4), random.random())
    g2 = torch.Generator().manual_seed(999)
    torch.manual_seed(0)
    random.seed(0)
    ckpt.restore_rank_state(state, g2)
    assert torch.equal(torch.rand(4, generator=g2), expected[0]) and torch.equal(torch.rand(4), expected[1])
    assert random.random() == expected[2] and state["step"] == 3
