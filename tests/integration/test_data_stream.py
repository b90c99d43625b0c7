"""The training stream: exact resume from a loader state, even sampling over any rank x worker
split, and real LR/HR pairs (aligned crops, mixed shards counted)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linearsr.data.batches import finish_batch
from linearsr.data.config import DataConfig
from linearsr.data.loader import make_train_loader, make_val_loader
from linearsr.data.reader import Stats
from linearsr.data.shards import build_shards, read_shard_manifest, shard_list
from linearsr.data.stream import TrainStream


def _cfg(root: str, **kw) -> DataConfig:
    base = dict(shards=root, crop=32, scale=4, batch_size=4, num_workers=0, shuffle_buffer=8, val_crop=32)
    return DataConfig(**{**base, **kw})


def _take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def _same(a: dict, b: dict) -> bool:
    return a["key"] == b["key"] and a["tags"] == b["tags"] and all(torch.equal(a[k], b[k]) for k in ("hr", "lr", "seed", "real_lr"))


@pytest.mark.parametrize("workers,crops", [(0, 1), (2, 2)])
def test_a_loader_state_continues_the_stream_exactly(tiny_shards, workers, crops):
    cfg = _cfg(tiny_shards, num_workers=workers, crops_per_image=crops)
    whole = make_train_loader(cfg, 0, 1, seed=7)
    try:
        expected = _take(whole, 14)
    finally:
        whole.close()
    first = make_train_loader(cfg, 0, 1, seed=7)
    try:
        _take(first, 9)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    finally:
        first.close()
    assert len(json.dumps(state)) < 2000 and state["samples"] == 36
    resumed = make_train_loader(cfg, 0, 1, seed=7, state=state)
    try:
        got = _take(resumed, 1)
        reread = resumed.accounting.read  # samples decoded to make the first batch after the resume
        got += _take(resumed, 4)
    finally:
        resumed.close()
    assert all(_same(a, b) for a, b in zip(expected[9:], got)), "the resumed stream differs"
    if workers == 0:  # no prefetching: at most one shuffle block was read again (36 were read before)
        assert reread <= cfg.shuffle_buffer + cfg.batch_size
    # the LR made on the device from the resumed batch is the one the uninterrupted run made
    assert torch.equal(finish_batch(got[0], cfg)["lr"], finish_batch(expected[9], cfg)["lr"])


def test_resume_is_exact_across_an_unreadable_shard(tiny_shards, tmp_path):
    """A missing shard makes a reader emit stats-only heartbeats between batches; they take turns in
    the DataLoader's round-robin, so a resumed loader must emit exactly the ones not yet seen."""
    root = shutil.copytree(tiny_shards, tmp_path / "shards")
    (root / read_shard_manifest(str(root))["splits"]["train"]["shards"][1]["path"]).unlink()
    # blocks of 6 crops, batches of 4: a heartbeat can come while a batch is half filled
    cfg = _cfg(str(root), num_workers=2, max_skip_fraction=1.0, shuffle_buffer=6)
    whole = make_train_loader(cfg, 0, 1, seed=3)
    try:
        expected = _take(whole, 12)
        assert whole.skips.get("missing_shard", 0) > 0
    finally:
        whole.close()
    for k in range(2, 10):
        first = make_train_loader(cfg, 0, 1, seed=3)
        try:
            _take(first, k)
            state = first.state_dict()
        finally:
            first.close()
        resumed = make_train_loader(cfg, 0, 1, seed=3, state=state)
        try:
            assert all(_same(a, b) for a, b in zip(expected[k:], _take(resumed, 12 - k))), f"differs after {k}"
        finally:
            resumed.close()


def test_a_state_from_another_layout_is_refused_in_one_sentence(tiny_shards):
    loader = make_train_loader(_cfg(tiny_shards, num_workers=2), 0, 2, seed=1)
    try:
        _take(loader, 2)
        state = loader.state_dict()
    finally:
        loader.close()
    with pytest.raises(ValueError, match=r"world_size=2 \(now 1\).*cannot continue this stream"):
        make_train_loader(_cfg(tiny_shards, num_workers=2), 0, 1, seed=1, state=state)
    with pytest.raises(ValueError, match=r"num_workers=2 \(now 1\)"):
        make_train_loader(_cfg(tiny_shards, num_workers=0), 0, 2, seed=1, state=state)
    with pytest.raises(ValueError, match=r"rank=0 \(now 1\)"):
        make_train_loader(_cfg(tiny_shards, num_workers=2), 1, 2, seed=1, state=state)
    with pytest.raises(ValueError, match="not a linearsr-loader/1 state"):
        make_train_loader(_cfg(tiny_shards), state={"step": 3})


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory, make_images) -> str:
    """17 train images in 5 shards of 4, 4, 4, 4 and 1 samples."""
    base = tmp_path_factory.mktemp("five")
    make_images(base / "src", n=17)
    build_shards(str(base / "src"), str(base / "shards"), samples_per_shard=4, val_fraction=0.0, progress=False)
    return str(base / "shards")


@pytest.mark.parametrize("world,workers", [(4, 1), (4, 2), (3, 2)])
def test_no_sample_is_drawn_more_often_than_another(five_shards, world, workers):
    """Every reader draws shards from the full list: each sample's read rate is the mean rate
    within sampling error (splitting 5 shards over 4 ranks first would read the samples of the
    1-sample shard's reader at 4x the rate)."""
    shards = shard_list(five_shards, read_shard_manifest(five_shards), "train")
    assert sorted(n for _, n in shards) == [1, 4, 4, 4, 4]
    reads = {url: 0 for url, _ in shards}
    cfg = _cfg(five_shards)
    draws = 3000 // (world * workers)
    for rank in range(world):
        for w in range(workers):
            stream = TrainStream(cfg, shards, 0, rank, w, Stats())
            for n in range(draws):
                reads[stream.shard(n)[0]] += 1
    rate = np.array([reads[url] for url, n in shards for _ in range(n)], dtype=float)  # per sample
    assert rate.max() / rate.mean() <= 1.15 and rate.min() / rate.mean() >= 0.85
    # the baseline: shards split between readers first (shard i to rank i % world, then to its workers;
    # a reader without a shard shares its rank's), each reader (DataLoader workers and ranks deliver
    # alike) resampling its own share: the expected rate per sample
    split = {url: 0.0 for url, _ in shards}
    for rank in range(world):
        mine = shards[rank::world] or shards
        for w in range(workers):
            share = mine[w::workers] or mine
            for url, _ in share:
                split[url] += 1 / sum(n for _, n in share)  # each reader reads samples at one rate
    skew = np.array([split[url] for url, n in shards for _ in range(n)])
    assert skew.max() / skew.mean() > (2.0 if workers > 1 else 1.05)  # what drawing from the full list fixes


def _pairs(folder: Path, src: Path, every: int = 2) -> None:
    """LR partners of every `every`-th HR image: its exact 4x4 area average, 8-bit PNG."""
    folder.mkdir()
    for i, p in enumerate(sorted(src.iterdir())):
        if i % every == 0:
            hr = torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1).float()
            lr = torch.nn.functional.avg_pool2d(hr[None], 4)[0].round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(lr).save(folder / f"{p.stem}.png")


def test_real_pairs_are_used_with_aligned_crops_and_mixed_shards_are_counted(tmp_path, make_images):
    make_images(tmp_path / "hr", n=12, size=(48, 64))
    _pairs(tmp_path / "lr", tmp_path / "hr")
    m = build_shards(str(tmp_path / "hr"), str(tmp_path / "shards"), samples_per_shard=4, val_fraction=0.25,
                     lr=str(tmp_path / "lr"), allow_unpaired=True, progress=False)
    assert m["settings"]["lr_scale"] == 4 and m["skipped"] == []
    assert m["splits"]["train"]["paired"] + m["splits"]["val"]["paired"] == 6
    cfg = _cfg(str(tmp_path / "shards"), num_workers=0, batch_size=6)
    loader = make_train_loader(cfg, seed=0)
    try:
        batches = [finish_batch(b, cfg) for b in _take(loader, 4)]
        paired = loader.paired
    finally:
        loader.close()
    real = [(b["hr"][i], b["lr"][i]) for b in batches for i in range(6) if torch.isnan(b["degradation"]["jpeg"][i])]
    assert 0 < paired == len(real) < 24  # mixed: both kinds, the real ones counted
    for hr, lr in real:  # the LR crop is the HR crop's aligned window: its area average, to the 8-bit rounding
        assert (torch.nn.functional.avg_pool2d(hr[None] * 255, 4)[0] - lr * 255).abs().max() <= 0.5 + 1e-3
    val = make_val_loader(cfg)
    assert sum(len(b["key"]) for b in val) == m["splits"]["val"]["samples"] and val.paired == m["splits"]["val"]["paired"]
    with pytest.raises(ValueError, match=r"pairs at x4, but data.scale=2; set data.scale=4"):
        make_train_loader(_cfg(str(tmp_path / "shards"), scale=2, crop=32, val_crop=32))
