"""`linearsr calibrate`: the measured residual scale gives the flow a unit-variance target, and only
that line of the preset changes."""

import dataclasses
import os
import tomllib

import pytest
import torch

from linearsr.main import main
from linearsr.trainer.calibrate import with_residual_scale

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
SMALL = ["data.num_workers=0", "data.crop=32", "data.batch_size=4", "data.shuffle_buffer=4"]


def test_calibrated_scale_gives_unit_variance_targets(tiny_shards, tmp_path, capsys):
    from linearsr.data.loader import make_train_loader
    from linearsr.model.network import LinearSR
    from linearsr.trainer.config import load_config

    preset = tmp_path / "c.toml"
    original = open(os.path.join(ROOT, "configs", "cpu_tiny.toml")).read()
    preset.write_text(original)
    assert main(["calibrate", "--config", str(preset), "--samples", "16", f"data.shards={tiny_shards}", *SMALL]) == 0
    assert "model.residual_scale = " in capsys.readouterr().out
    written = preset.read_text()
    changed = [ln for ln in written.splitlines() if ln not in original.splitlines()]
    assert len(changed) == 1 and changed[0].startswith("residual_scale = ")
    scale = tomllib.loads(written)["model"]["residual_scale"]
    # the trainer's own target, on the same 16 crops, now has unit std
    cfg = load_config(str(preset), [f"data.shards={tiny_shards}", *SMALL])
    model = LinearSR(dataclasses.replace(cfg.model, width=8, depth=1, heads=1))
    loader = make_train_loader(cfg.data, 0, 1, cfg.run.seed)
    x0 = torch.cat([model.target(b["hr"], b["lr"]).flatten() for b in (next(loader) for _ in range(4))])
    loader.close()
    assert scale != 10 and x0.double().std(correction=0).item() == pytest.approx(1.0, abs=2e-3)


def test_only_the_residual_scale_line_is_written():
    text = '[run]\nname = "x"\n\n[model]   # note\nwidth = 8  # keep\nresidual_scale = 10.0  # old\n[data]\ncrop = 64\n'
    new = with_residual_scale(text, 3.14159, "measured")
    assert new == text.replace("residual_scale = 10.0  # old", "residual_scale = 3.142   # measured")
    inserted = with_residual_scale('[model]\nwidth = 8\n', 2.0, "m")
    assert tomllib.loads(inserted)["model"] == {"residual_scale": 2.0, "width": 8}
    appended = with_residual_scale('[run]\nname = "x"', 2.0, "m")
    assert tomllib.loads(appended) == {"run": {"name": "x"}, "model": {"residual_scale": 2.0}}
    with pytest.raises(ValueError, match="set residual_scale = 2 by hand"):
        with_residual_scale('model = {width = 8}\n', 2.0, "m")


def test_calibrate_refuses_what_it_cannot_write(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["calibrate", "--config", str(tmp_path / "config.json")]) == 1
    assert "calibrate writes into a TOML preset" in capsys.readouterr().err
    preset = tmp_path / "c.toml"
    preset.write_text('[model]\nresidual = false\n')
    assert main(["calibrate", "--config", str(preset)]) == 1
    assert "model.residual = false" in capsys.readouterr().err
