"""`linearsr demo` (make demo) refuses to start without its inputs, with the make target that makes them."""

from linearsr.main import main


def test_demo_names_the_make_target_for_missing_inputs(tmp_path, capsys):
    assert main(["demo", "--run", str(tmp_path / "run"), "--shards", str(tmp_path / "no-shards")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make data" in err
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    assert main(["demo", "--run", str(tmp_path / "run"), "--shards", str(shards), "--devset", str(tmp_path / "nodev")]) == 1
    assert "make devset" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the inputs are there
