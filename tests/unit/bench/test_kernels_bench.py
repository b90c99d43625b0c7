"""`linearsr bench gpu` runs end to end on CPU in --quick mode and writes the rows the GPU run fills."""

from __future__ import annotations

import json

import pytest

from linearsr.bench.gpu import QUICK, targets
from linearsr.main import main


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_attention_rows_cover_every_backend_and_size(quick_result):
    rows = {(r["backend"], r["tokens"]): r for r in quick_result["attention"]}
    assert set(rows) == {(b, n) for b in ("sdpa", "torch", "fla", "fused") for n in QUICK.tokens}
    for n in QUICK.tokens:
        for backend in ("sdpa", "torch"):
            r = rows[(backend, n)]
            assert r["status"] == "ok", r
            assert 0 < r["fwd_ms"] and 0 < r["fwd_bwd_ms"]
            assert 0 < r["floor_fwd_ms"] < r["floor_fwd_bwd_ms"] and r["x_floor_fwd_bwd"] > 1
        for backend in ("fla", "fused"):
            assert rows[(backend, n)]["status"] == "skipped: needs CUDA"


def test_model_latency_ratio_and_training_rows(quick_result):
    model = {(r["attention"], r["out_px"]): r for r in quick_result["model"]}
    for px in QUICK.out_px:
        assert model[("torch", px)]["status"] == "ok" and model[("torch", px)]["ms"] > 0
        assert model[("torch", px)]["tokens"] == (px // 4) ** 2  # cpu_tiny: pixel-unshuffle 4, patch 1
        sdpa = model[("sdpa", px)]["status"]
        assert sdpa == "ok" if px <= QUICK.softmax_max_px else sdpa.startswith("skipped: softmax")
        assert model[("fused", px)]["status"] == "skipped: needs CUDA"
    (ratio,) = [r for r in quick_result["model_ratio"] if r["attention"] == "torch"]
    assert ratio["time_ratio"] > 0 and ratio["pixel_ratio"] == 4
    train = {r["attention"]: r for r in quick_result["train"]}
    assert train["torch"]["status"] == "ok", train["torch"]
    assert train["torch"]["tflop_per_step"] > 0 and train["torch"]["samples_per_s"] > 0
    assert train["fused"]["status"] == "skipped: needs CUDA"
    assert quick_result["env"]["device"] == "cpu" and quick_result["env"]["hbm_gbps_measured"] > 0
    assert [t["met"] for t in quick_result["targets"]] == [None] * 5  # quick sizes are not the targets' sizes


def test_targets_judge_the_measured_rows():
    def att(backend, n, ms, x_floor):
        return {"backend": backend, "tokens": n, "status": "ok", "fwd_bwd_ms": ms, "x_floor_fwd_bwd": x_floor}

    result = {
        "attention": [att("sdpa", 1024, 0.4, 9), att("fused", 1024, 0.3, 9), att("sdpa", 4096, 0.6, 9),
                      att("fused", 4096, 0.7, 5), att("fused", 65536, 2.0, 2.5)],
        "model": [{"attention": "fused", "out_px": 1024, "status": "ok", "ms": 14.0},
                  {"attention": "sdpa", "out_px": 1024, "status": "ok", "ms": 9.0}],
        "model_ratio": [{"attention": "fused", "time_ratio": 19.0}],
        "train": [{"status": "ok", "mfu": 0.45}, {"status": "error: x", "mfu": None}],
    }
    assert [t["met"] for t in targets(result)] == [False, True, True, False, True]  # fused loses to SDPA at 4k; ratio 19 > 18
    assert [t["met"] for t in targets({})] == [None] * 5


def test_bad_options_get_a_one_line_error(capsys, tmp_path):
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--sections", "speed", "--out", str(tmp_path / "x.json")]) == 1
    assert "unknown section/backend speed" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    assert main(["bench", "gpu", "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 1
    assert "needs a GPU" in capsys.readouterr().err
