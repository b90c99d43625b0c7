"""The run-directory contract shared by the trainer (writer) and the sidecar (reader)."""

import math
import os

from linearsr.core.storage import dumps, loads
from linearsr.trainer.configlib import apply_overrides, from_dict, parse_value
from linearsr.trainer.rundir import MetricsWriter, RunDir, parse_jsonl, read_metrics


def test_nonfinite_round_trip_as_strings():
    text = dumps({"val_loss": math.nan, "x": math.inf, "y": -math.inf, "z": 1.5})
    assert "NaN" not in text and '"nan"' in text
    back = loads(text)
    assert math.isnan(back["val_loss"]) and back["x"] == math.inf and back["y"] == -math.inf


def test_partial_last_line_is_ignored():
    text = '{"step": 1}\n{"step": 2}\n{"step": 3, "val_lo'
    assert [r["step"] for r in parse_jsonl(text)] == [1, 2]
    assert [r["step"] for r in parse_jsonl('{"step": 1}\n{"step": 2}')] == [1, 2]


def test_writer_appends_and_truncates_on_resume(tmp_path):
    run = str(tmp_path / "run")
    w = MetricsWriter(run)
    for s in (10, 20, 30):
        w.append({"step": s, "val_loss": 1.0 / s})
    # a crash leaves a torn line; resume from the checkpoint at step 20
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 40, "val')
    w2 = MetricsWriter(run, resume_step=20)
    w2.append({"step": 30, "val_loss": 0.1})
    assert [r["step"] for r in read_metrics(run)] == [10, 20, 30]
    assert RunDir(run).expert(2, "0,3").url.endswith(os.path.join("experts", "2_0_3"))


def test_overrides_and_unknown_keys():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Optim:
        lr: float = 1e-3
        betas: tuple[float, float] = (0.9, 0.99)

    @dataclass(frozen=True)
    class Cfg:
        optim: Optim = field(default_factory=Optim)
        name: str = "x"

    d = apply_overrides({}, ["optim.lr=2e-4", "name=demo", "optim.betas=[0.8, 0.9]"])
    cfg = from_dict(Cfg, d)
    assert cfg.optim.lr == 2e-4 and cfg.name == "demo" and cfg.optim.betas == (0.8, 0.9)
    import pytest

    with pytest.raises(ValueError, match="optim.lrr"):
        from_dict(Cfg, {"optim": {"lrr": 1}})
    with pytest.raises(ValueError, match="'optim.lr' must be a number"):
        from_dict(Cfg, {"optim": {"lr": "fast"}})
    assert parse_value("true") is True and parse_value("abc") == "abc"
