"""The shard builder on local folders: round trip, manifest, skips, rebuilds, CLI."""

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from linearsr.data.reader import iter_samples
from linearsr.data.shards import build_shards, read_shard_manifest
from linearsr.main import main


def _stored(root) -> dict[str, dict]:
    out = {}
    for split in ("train", "val"):
        for s in iter_samples(str(root), split):
            ext = "png" if "png" in s else "jpg"
            out[s["__key__"]] = {"bytes": s[ext], "ext": ext, "meta": json.loads(s["json"]), "split": split}
    return out


def test_round_trip_keeps_bytes_tags_and_a_truthful_manifest(tmp_path, make_images):
    paths = make_images(tmp_path / "src", n=7)
    (tmp_path / "src" / "nested").mkdir()
    nested = make_images(tmp_path / "src" / "nested", n=1, seed=5)[0]
    (tmp_path / "src" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    tags = {"img001.jpg": ["cat", "Grass "], "nested/img000.png": "sky, tree"}
    m = build_shards(str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=3, val_fraction=0.2, tags=tags,
                     progress=False)
    stored = _stored(tmp_path / "out")
    assert stored["img001"]["bytes"] == paths[1].read_bytes() and stored["img001"]["ext"] == "jpg"
    assert stored["img000"]["bytes"] == paths[0].read_bytes() and stored["img000"]["ext"] == "png"
    assert stored["nested_img000"]["bytes"] == nested.read_bytes()
    assert stored["img001"]["meta"] == {"source": "img001.jpg", "width": 68, "height": 52, "tags": ["cat", "grass"]}
    assert stored["nested_img000"]["meta"]["tags"] == ["sky", "tree"]
    assert m["skipped"] == [{"source": "broken.png", "error": m["skipped"][0]["error"]}] and len(stored) == 8
    assert m["tags"] == {"cat": 1, "grass": 1, "sky": 1, "tree": 1}
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["samples"] == sum(1 for v in stored.values() if v["split"] == split) > 0
        assert info["bytes"] == sum(s["bytes"] for s in info["shards"])
        for s in info["shards"]:
            data = (tmp_path / "out" / s["path"]).read_bytes()
            assert s["bytes"] == len(data)
            assert s["sha256"] == hashlib.sha256(data).hexdigest()
            with tarfile.open(tmp_path / "out" / s["path"]) as t:
                assert len(t.getnames()) == 2 * s["samples"]
    assert read_shard_manifest(str(tmp_path / "out")) == m


def test_val_split_depends_on_the_key_only_and_is_never_empty(tmp_path, make_images):
    make_images(tmp_path / "src", n=12)
    a = build_shards(str(tmp_path / "src"), str(tmp_path / "a"), val_fraction=0.25, seed=0, progress=False)
    build_shards(str(tmp_path / "src"), str(tmp_path / "b"), val_fraction=0.25, seed=1, progress=False)
    val_a = {k for k, v in _stored(tmp_path / "a").items() if v["split"] == "val"}
    val_b = {k for k, v in _stored(tmp_path / "b").items() if v["split"] == "val"}
    assert val_a == val_b and a["splits"]["val"]["samples"] == len(val_a) >= 1
    tiny = build_shards(str(tmp_path / "src" / "img000.png"), str(tmp_path / "c"), val_fraction=0.0, progress=False)
    assert tiny["splits"]["val"]["samples"] == 0 and tiny["splits"]["train"]["samples"] == 1


def test_max_side_downscales_to_png(tmp_path):
    (tmp_path / "src").mkdir()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "src" / "big.jpg")
    build_shards(str(tmp_path / "src"), str(tmp_path / "out"), max_side=150, val_fraction=0, progress=False)
    s = _stored(tmp_path / "out")["big"]
    assert s["ext"] == "png" and s["meta"]["width"] == 150 and s["meta"]["height"] == 100


def test_rebuilding_into_the_same_root_leaves_only_the_new_shards(tmp_path, make_images):
    make_images(tmp_path / "old", n=12, seed=1)
    make_images(tmp_path / "new", n=3, seed=2, formats=("png",))
    (tmp_path / "new" / "img000.png").rename(tmp_path / "new" / "fresh.png")
    root = str(tmp_path / "out")
    build_shards(str(tmp_path / "old"), root, samples_per_shard=2, val_fraction=0.2, progress=False)
    with pytest.raises(ValueError, match="already holds shards; pass --overwrite"):
        build_shards(str(tmp_path / "new"), root, progress=False)
    m = build_shards(str(tmp_path / "new"), root, samples_per_shard=2, val_fraction=0.2, overwrite=True, progress=False)
    assert set(_stored(root)) == {"fresh", "img001", "img002"}
    on_disk = sorted(str(p.relative_to(root)) for p in Path(root).rglob("shard-*.tar"))
    assert on_disk == sorted(s["path"] for sp in m["splits"].values() for s in sp["shards"])


def test_cli_builds_and_reports_errors_in_one_line(tmp_path, make_images, capsys):
    make_images(tmp_path / "src", n=4)
    (tmp_path / "tags.json").write_text(json.dumps({"img000": ["dog"]}))
    assert main(["shards", "build", str(tmp_path / "src"), str(tmp_path / "out"), "--samples-per-shard", "2",
                 "--val-fraction", "0.25", "--tags", str(tmp_path / "tags.json"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["splits"]["train"]["samples"] + summary["splits"]["val"]["samples"] == 4 and summary["tags"] == 1
    assert main(["shards", "build", str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "source" in err and "does not exist" in err
    assert main(["shards", "build", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["shards", "info", str(tmp_path / "out")]) == 0


def test_verify_names_every_damaged_shard_and_how_to_fix_it(tmp_path, make_images, capsys):
    make_images(tmp_path / "src", n=10)
    root = tmp_path / "out"
    build_shards(str(tmp_path / "src"), str(root), samples_per_shard=2, val_fraction=0.2, progress=False)
    assert main(["shards", "verify", str(root), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("ok: 5 shards, 10 samples")

    shards = [s["path"] for split in ("train", "val") for s in read_shard_manifest(str(root))["splits"][split]["shards"]]
    (root / shards[0]).unlink()                                     # lost
    data = (root / shards[1]).read_bytes()
    (root / shards[1]).write_bytes(data[: len(data) // 2])          # cut short mid-sample
    flipped = bytearray((root / shards[2]).read_bytes())
    flipped[700] ^= 0xFF                                            # same size, changed bytes
    (root / shards[2]).write_bytes(bytes(flipped))
    assert main(["shards", "verify", str(root), "--no-progress"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{shards[0]}: missing"
    assert lines[1].startswith(f"{shards[1]}: ") and ("bytes" in lines[1] or "tar" in lines[1])
    assert lines[2] == f"{shards[2]}: its sha256 differs from the manifest's (the bytes changed after the build)"
    assert lines[3].startswith(f"3 of 5 shards under {root} do not match manifest.json") and "--overwrite" in lines[3]
    assert len(lines) == 4  # the undamaged shards are not reported


def test_verify_reads_shards_on_s3(tmp_path, make_images, s3_bucket, capsys):
    make_images(tmp_path / "src", n=4)
    build_shards(str(tmp_path / "src"), f"{s3_bucket}/shards", samples_per_shard=2, val_fraction=0.25, progress=False)
    assert main(["shards", "verify", f"{s3_bucket}/shards", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def _lr_of(path: Path, out: Path, factor: int, size: tuple[int, int] | None = None) -> None:
    with Image.open(path) as im:
        im.convert("RGB").resize(size or (im.width // factor, im.height // factor), Image.Resampling.BOX).save(out)


def test_real_pairs_are_stored_and_every_bad_pair_is_named_and_counted(tmp_path, make_images, capsys):
    hr = make_images(tmp_path / "hr", n=6)
    (tmp_path / "lr").mkdir()
    _lr_of(hr[0], tmp_path / "lr" / "img000.jpg", 4)  # a JPEG partner is fine (stored as PNG)
    _lr_of(hr[1], tmp_path / "lr" / "img001.png", 4, size=(13, 17))  # no integer scale
    _lr_of(hr[3], tmp_path / "lr" / "img003.png", 2)  # another scale than the first pair's
    _lr_of(hr[4], tmp_path / "lr" / "img004.png", 4)
    _lr_of(hr[5], tmp_path / "lr" / "img005.png", 4)
    _lr_of(hr[0], tmp_path / "lr" / "stray.png", 4)  # no HR partner; img002 has no LR partner
    rc = main(["shards", "build", str(tmp_path / "hr"), str(tmp_path / "out"), "--lr", str(tmp_path / "lr"),
               "--val-fraction", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    m = read_shard_manifest(str(tmp_path / "out"))
    bad = {x["source"]: x["error"] for x in m["skipped"]}
    stray = f"{tmp_path / 'lr'}/stray.png"
    assert set(bad) == {hr[1].name, hr[2].name, hr[3].name, stray}
    assert "not an integer multiple of LR 13x17" in bad[hr[1].name] and "missing partner" in bad[hr[2].name]
    assert "is x2, the other pairs are x4" in bad[hr[3].name] and "without an HR image" in bad[stray]
    for name in bad:
        assert f"skipped {name}: " in out
    assert m["splits"]["train"]["samples"] == m["splits"]["train"]["paired"] == 3 and m["settings"]["lr_scale"] == 4
    assert "real LR/HR pairs at x4: 3 of 3 samples" in out
    stored = {s["__key__"]: s for s in iter_samples(str(tmp_path / "out"))}
    with Image.open(__import__("io").BytesIO(stored["img000"]["lr.png"])) as lr, Image.open(hr[0]) as full:
        assert lr.format == "PNG" and (lr.width * 4, lr.height * 4) == full.size
    # with --allow-unpaired the HR without a partner stays, as an HR-only sample
    m = build_shards(str(tmp_path / "hr"), str(tmp_path / "mixed"), val_fraction=0, lr=str(tmp_path / "lr"),
                     allow_unpaired=True, progress=False)
    assert m["splits"]["train"]["samples"] == 4 and m["splits"]["train"]["paired"] == 3
    with pytest.raises(ValueError, match="--max-side cannot be combined with --lr"):
        build_shards(str(tmp_path / "hr"), str(tmp_path / "x"), max_side=32, lr=str(tmp_path / "lr"))
