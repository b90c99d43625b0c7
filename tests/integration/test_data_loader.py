"""Loaders over local shards: batch contract, rank/worker splitting, determinism, bad data."""

import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linearsr.data.batches import crop_pair, finish_batch, to_tensor
from linearsr.data.config import DataConfig, DegradationConfig
from linearsr.data.loader import DataQualityError, make_train_loader, make_val_loader
from linearsr.data.reader import iter_samples


def _cfg(root: str, **kw) -> DataConfig:
    base = dict(shards=root, crop=32, scale=4, batch_size=4, num_workers=0, shuffle_buffer=8, val_crop=32,
                degradation=DegradationConfig())
    return DataConfig(**{**base, **kw})


def _manifest(root: str) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())


def _val_keys(root: str) -> list[str]:
    return [s["__key__"] for s in iter_samples(root, "val")]


def _val_pass(cfg: DataConfig, rank: int = 0, world: int = 1) -> dict[str, dict]:
    out = {}
    for b in make_val_loader(cfg, rank, world):
        for i, key in enumerate(b["key"]):
            assert key not in out, f"{key} read twice"
            out[key] = {"lr": b["lr"][i], "hr": b["hr"][i], "tags": b["tags"][i]}
    return out


@pytest.fixture
def shards_copy(tiny_shards, tmp_path) -> str:
    """A private copy of the session's tiny shards, safe to damage."""
    return str(shutil.copytree(tiny_shards, tmp_path / "shards"))


def _first(cfg: DataConfig, n: int, seed: int = 0, rank: int = 0, world: int = 1) -> list[dict]:
    loader = make_train_loader(cfg, rank, world, seed)
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


def test_train_batches_follow_the_contract_and_both_degrade_ons_agree(tiny_shards):
    loader = make_train_loader(_cfg(tiny_shards, num_workers=2, degrade_on="loader"), rank=0, world_size=1, seed=0)
    try:
        batches = [next(loader) for _ in range(6)]
    finally:
        loader.close()
    b = batches[-1]
    assert b["hr"].shape == (4, 3, 32, 32) and b["lr"].shape == (4, 3, 8, 8)
    assert b["hr"].dtype == b["lr"].dtype == torch.float32
    assert 0 <= float(b["lr"].min()) and float(b["hr"].max()) <= 1
    assert all(t in (["red", "synthetic"], ["blue", "synthetic"]) for t in b["tags"])
    assert set(b) == {"lr", "hr", "tags", "key", "degradation"} and len(b["key"]) == 4
    assert set(b["degradation"]) >= {"blur", "noise", "jpeg"} and b["degradation"]["jpeg"].shape == (4,)
    assert loader.samples == 24 and loader.skips == {}
    train_keys = {s["__key__"] for s in iter_samples(tiny_shards, "train")}
    assert {k for x in batches for k in x["key"]} <= train_keys
    # "device": the worker ships HR + seeds, finish_batch makes the same LR where the batch lands
    device = _first(_cfg(tiny_shards, num_workers=2, degrade_on="device"), 6)
    assert set(device[0]) == {"hr", "lr", "real_lr", "seed", "tags", "key"}
    for x, y in zip(batches, device):
        done = finish_batch(y, _cfg(tiny_shards), "cpu")
        assert x["key"] == done["key"] and torch.equal(x["hr"], done["hr"]) and torch.equal(x["lr"], done["lr"])


def test_train_stream_is_seeded_by_seed_rank_and_worker(tiny_shards):
    cfg = _cfg(tiny_shards, num_workers=2, degrade_on="loader")
    a, b, c = _first(cfg, 3), _first(cfg, 3), _first(cfg, 3, seed=1)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["lr"], y["lr"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c]  # another seed: another stream
    r0, r1 = _first(cfg, 3, rank=0, world=2), _first(cfg, 3, rank=1, world=2)
    assert [x["key"] for x in r0] != [x["key"] for x in r1]  # ranks draw their own shards


def test_two_ranks_two_workers_read_every_val_sample_exactly_once(tiny_shards):
    cfg = _cfg(tiny_shards, num_workers=2, batch_size=2)
    seen = []
    for rank in range(2):
        loader = make_val_loader(cfg, rank, 2)
        keys = [k for b in loader for k in b["key"]]
        assert len(keys) == loader.num_samples
        seen += keys
    expected = _val_keys(tiny_shards)
    assert len(expected) >= 4
    assert sorted(seen) == sorted(expected)  # each once, none missing


def test_val_is_deterministic_across_passes_and_rank_layouts(tiny_shards):
    single = _val_pass(_cfg(tiny_shards))
    again = _val_pass(_cfg(tiny_shards))
    split = {}
    for rank in range(2):
        split.update(_val_pass(_cfg(tiny_shards, num_workers=2), rank, 2))
    assert single.keys() == again.keys() == split.keys()
    for k in single:
        assert torch.equal(single[k]["lr"], again[k]["lr"]) and torch.equal(single[k]["lr"], split[k]["lr"])
    # the HR is the centre crop of the stored image, bit for bit
    for s in iter_samples(tiny_shards, "val"):
        ext = "png" if "png" in s else "jpg"
        with Image.open(__import__("io").BytesIO(s[ext])) as img:
            ref = to_tensor(crop_pair(np.asarray(img.convert("RGB")), None, 32, 4, None)[0])
        assert torch.equal(single[s["__key__"]]["hr"], ref)
    limited = _val_pass(_cfg(tiny_shards, val_max_samples=3))
    assert list(limited) == list(single)[:3]


# --------------------------------------------------------------------------- bad data


def _members(tar_path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar_path) as t:
        return t.getmembers()


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _val_shard(root: str, i: int = 0) -> tuple[Path, int]:
    s = _manifest(root)["splits"]["val"]["shards"][i]
    return Path(root) / s["path"], s["samples"]


def _run_val_with_fault(root: str, caplog, num_workers: int = 0) -> tuple[dict, int, int]:
    total = _manifest(root)["splits"]["val"]["samples"]
    cfg = _cfg(root, num_workers=num_workers, max_skip_fraction=1.0)
    loader = make_val_loader(cfg)
    with caplog.at_level(logging.WARNING, logger="linearsr.data"):
        got = sum(len(b["key"]) for b in loader)
    assert got + sum(loader.skips.values()) == total  # every sample delivered or accounted for
    return loader.skips, got, total


def test_corrupt_image_is_skipped_counted_and_warned(shards_copy, caplog):
    path, _ = _val_shard(shards_copy)
    image = next(m for m in _members(path) if not m.name.endswith(".json"))
    _overwrite(path, image.offset_data, b"\0" * image.size)
    skips, got, total = _run_val_with_fault(shards_copy, caplog)
    assert skips == {"corrupt_image": 1} and got == total - 1
    assert f"corrupt image: {image.name.split('.')[0]} in {path}" in caplog.text


def test_truncated_shard_is_skipped_counted_and_warned(shards_copy, caplog):
    path, n = _val_shard(shards_copy)
    third = _members(path)[2]
    os.truncate(path, third.offset_data + third.size // 2)
    skips, got, total = _run_val_with_fault(shards_copy, caplog)
    assert set(skips) == {"truncated_shard"} and 1 <= skips["truncated_shard"] <= n
    assert "truncated shard" in caplog.text and str(path) in caplog.text


def test_missing_shard_is_skipped_counted_and_warned(shards_copy, caplog):
    path, n = _val_shard(shards_copy)
    path.unlink()
    skips, got, total = _run_val_with_fault(shards_copy, caplog, num_workers=2)  # counters come from the workers
    assert skips == {"missing_shard": n} and got == total - n


def test_shard_that_ends_early_is_noticed_from_the_manifest(shards_copy, caplog):
    path, n = _val_shard(shards_copy)
    second_sample_header = _members(path)[2]
    _overwrite(path, second_sample_header.offset, b"x" * 512)  # tar stops silently at a bad header
    with tarfile.open(path, "r|") as t:
        assert len([m for m in t]) == 2  # tarfile itself reports no error
    skips, got, total = _run_val_with_fault(shards_copy, caplog)
    assert skips == {"short_shard": n - 1}
    assert "short shard" in caplog.text and f"manifest says {n}" in caplog.text


def test_too_many_skips_stop_training_with_a_clear_error(shards_copy):
    shards = _manifest(shards_copy)["splits"]["train"]["shards"]
    for s in shards[: len(shards) // 2]:
        (Path(shards_copy) / s["path"]).unlink()
    cfg = _cfg(shards_copy, num_workers=2, max_skip_fraction=0.1, skip_check_after=20)
    loader = make_train_loader(cfg, seed=0)
    with pytest.raises(DataQualityError, match=r"training data: \d+ of \d+ samples skipped .*max_skip_fraction=0.1.*missing_shard"):
        for _ in range(500):
            next(loader)
    loader.close()
    tolerant = make_train_loader(_cfg(shards_copy, num_workers=2, max_skip_fraction=0.9, skip_check_after=20), seed=0)
    try:
        for _ in range(20):
            next(tolerant)
        missing = tolerant.skips["missing_shard"]
    finally:
        tolerant.close()
    assert missing > 0 and missing % 4 == 0  # whole shards of 4 samples, summed over both workers
    assert set(tolerant.skips) == {"missing_shard"}


def test_missing_manifest_and_empty_roots_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json under shard root .*linearsr shards build"):
        make_train_loader(_cfg(str(tmp_path)))
    with pytest.raises(ValueError, match="rank must be in"):
        make_val_loader(_cfg(str(tmp_path)), rank=2, world_size=2)
