import json

from linearsr.main import main


def test_attention_bench_prints_both_backends_and_the_ratio(capsys):
    assert main(["bench", "attention", "--tokens", "16,64", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["tokens"] for r in out["rows"]] == [16, 64]
    assert all(r["torch_ms"] > 0 and r["sdpa_ms"] > 0 and r["sdpa/torch"] > 0 for r in out["rows"])
    assert main(["bench", "attention", "--tokens", "16", "--repeats", "1"]) == 0
    assert "sdpa/torch" in capsys.readouterr().out
    assert main(["bench", "attention", "--tokens", "a,b"]) == 1
