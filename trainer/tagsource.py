"""The tags a training run conditions on, the same at every start of the run (config `[tags]`).

    cfg, tags = open_tag_source(cfg, run_url, rank)    # in Trainer.build, before the model exists
    tags(batch) -> list[list[str]]                     # per training batch
    tags.relabel(val_batches)                          # once, on the held-out batches

tags.source = "tagger": every sample is tagged by the tagger from its own LR crop, exactly as
`linearsr upscale` tags an image with the same tagger (one window per crop), so the model trains
on the tags it will be given. The tagger file is copied into the run dir at the run's first start
(RUN/tagger.safetensors + .json) and the resolved config (RUN/config.json, every checkpoint) names
that copy: a resume, and every expert fine-tuned from the run's config, tags with the same tagger
even if the file it came from changes. The photo tags in the shards are then only the tagger's
training labels.
tags.source = "photo": the photo-level tags stored in the shards, attached to every crop (the ablation),
plus, under data.degradation.mode = "realistic", the degradation tags each crop's own parameters earn
("strong blur", "heavy noise", "jpeg artifacts"; the tagger learns to predict those from the LR).

Either way `model.tag_set` becomes the tags the model can meet in training (the tagger's emitted
tags, or every tag in the shards): the bundle carries it, so `linearsr upscale` can tell an unseen
tag (model/tags.py). A config that already names a tag_set (a resume, an expert) must agree."""

from __future__ import annotations

import logging
import os
import tempfile

import torch

from linearsr.core import storage
from linearsr.model.tagger import Tagger
from linearsr.trainer.config import TrainConfig

log = logging.getLogger(__name__)

RUN_TAGGER = "tagger.safetensors"


def _read_bytes(url: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"tags.tagger {url} does not exist; `linearsr tagger train --out PREFIX` writes one") from None


def _sidecar(weights_url: str) -> str:
    return weights_url.removesuffix(".safetensors") + ".json"


def _run_tagger(cfg: TrainConfig, run_url: str, rank: int) -> tuple[str, dict[str, bytes]]:
    """The run's own copy of the tagger: (its URL, {".safetensors": bytes, ".json": bytes}).
    At the first start rank 0 copies tags.tagger into the run dir (the JSON last: a copy with its
    JSON is complete)."""
    copy = storage.join(run_url, RUN_TAGGER)
    if storage.exists(_sidecar(copy)):
        files = {".safetensors": _read_bytes(copy), ".json": _read_bytes(_sidecar(copy))}
        if cfg.tags.tagger.rstrip("/") != copy and _read_bytes(cfg.tags.tagger) != files[".safetensors"]:
            log.warning("tags.tagger %s differs from the tagger this run started with; the run keeps tagging with its "
                        "own copy %s (a new tagger needs a new run)", cfg.tags.tagger, copy)
        return copy, files
    files = {".safetensors": _read_bytes(cfg.tags.tagger), ".json": _read_bytes(_sidecar(cfg.tags.tagger))}
    if rank == 0:
        storage.write_bytes_atomic(copy, files[".safetensors"])
        storage.write_bytes_atomic(_sidecar(copy), files[".json"])
        log.info("tagger %s copied into the run: %s", cfg.tags.tagger, copy)
    return copy, files


def _load(files: dict[str, bytes]) -> Tagger:
    with tempfile.TemporaryDirectory(prefix="linearsr-tagger-") as tmp:
        for suffix, data in files.items():
            with open(os.path.join(tmp, "tagger" + suffix), "wb") as f:
                f.write(data)
        return Tagger.load(os.path.join(tmp, "tagger.safetensors"))


def _degradation_tags(cfg: TrainConfig) -> bool:
    """Photo mode conditions on the exact degradation tags too, where the degradation makes any."""
    return cfg.tags.source == "photo" and cfg.data.degradation.mode == "realistic"


class TagSource:
    def __init__(self, cfg: TrainConfig, tagger: Tagger | None, device: torch.device | str = "cpu"):
        self.max_tags, self.device = cfg.model.max_tags, device
        self.tagger = tagger.to(device) if tagger is not None else None
        self.thresholds = cfg.data.degradation.tags if _degradation_tags(cfg) else None

    def tags_for(self, lr: torch.Tensor, photo_tags: list[list[str]], params: dict | None = None) -> list[list[str]]:
        """lr [B, 3, h, w] training crops, their photos' tags and (photo mode) their degradation
        parameters -> the tags to condition on."""
        if self.tagger is not None:
            return self.tagger.tag_crops(lr.to(self.device), self.max_tags)
        if self.thresholds is None or params is None:
            return photo_tags
        from linearsr.data.degradations import degradation_tags

        return [(list(p) + d)[:self.max_tags] for p, d in zip(photo_tags, degradation_tags(params, self.thresholds))]

    def __call__(self, batch: dict) -> list[list[str]]:
        return self.tags_for(batch["lr"], batch["tags"], batch.get("degradation"))

    def relabel(self, val_batches: list) -> None:
        """Give each held-out batch (trainer.validate.ValBatch) the tags training would give it."""
        for vb in val_batches:
            vb.tags = self.tags_for(vb.lr, vb.tags)


def open_tag_source(cfg: TrainConfig, run_url: str, rank: int, device: torch.device | str = "cpu") -> tuple[TrainConfig, TagSource]:
    """The config with model.tag_set (and, with a tagger, tags.tagger = the run's copy) resolved,
    and the source that tags the batches."""
    tagger = None
    if cfg.tags.source == "tagger":
        url, files = _run_tagger(cfg, run_url, rank)
        tagger = _load(files)
        tag_set = tuple(sorted(tagger.emitted))
        if not tag_set:
            raise ValueError(f"the tagger {cfg.tags.tagger} emits no tag (none reached its precision target); "
                             "retrain it with a lower --precision, or set tags.source='photo'")
        cfg = cfg.replace(tags={"tagger": url})
    else:
        from linearsr.data.shards import read_shard_manifest
        from linearsr.trainer.tagger_fit import DEGRADATION_TAGS

        shard_tags = set(read_shard_manifest(cfg.data.shards, cfg.data.s3_endpoint).get("tags") or {})
        tag_set = tuple(sorted(shard_tags | (set(DEGRADATION_TAGS) if _degradation_tags(cfg) else set())))
    if cfg.model.tag_set and cfg.model.tag_set != tag_set:
        missing, extra = sorted(set(tag_set) - set(cfg.model.tag_set)), sorted(set(cfg.model.tag_set) - set(tag_set))
        raise ValueError(f"model.tag_set of the config differs from the tags of its tag source (tags.source="
                         f"{cfg.tags.source!r}): new {missing[:5]}, gone {extra[:5]}; the weights were trained on the "
                         "config's tags, so keep the tag source the run started with")
    cfg = cfg.replace(model={"tag_set": tag_set})
    return cfg, TagSource(cfg, tagger, device)
