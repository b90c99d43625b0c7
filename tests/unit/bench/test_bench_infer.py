"""`linearsr bench infer --quick`: the inference benchmark's tables, at toy sizes."""

import json

from linearsr.main import main


def test_bench_infer_measures_tiling_and_scaling(tmp_path, capsys):
    out = tmp_path / "infer.json"
    assert main(["bench", "infer", "--quick", "--sections", "tiling,scaling", "--repeats", "1", "--threads", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    tiling = result["tiling"]
    assert [r["mode"] for r in tiling] == ["untiled", "exact, tile 8"]
    for untiled, exact in zip(tiling[::2], tiling[1::2]):
        assert exact["max_abs_diff"] <= 1e-4  # the exact-tiled image is the untiled one
        assert untiled["peak_mib"] >= 0 and exact["seconds"] > 0 and "peak_ratio" in exact
    scaling = result["scaling"]
    assert [(r["attention"], r["out_px"]) for r in scaling] == [("linear", 32), ("linear", 64), ("linear", 128),
                                                                ("softmax (sdpa)", 32), ("softmax (sdpa)", 64)]
    assert all(r["time_vs_quarter_pixels"] > 0 for r in scaling if r["out_px"] > 32)
    assert "time(4x pixels) / time(pixels)" in capsys.readouterr().out


def test_bench_infer_bad_options_are_one_line(capsys):
    assert main(["bench", "infer", "--sections", "tilling"]) == 1
    assert "unknown section tilling; choose from tiling, scaling, latent" in capsys.readouterr().err
