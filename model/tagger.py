"""The TAG tagger: a small multi-label classifier from an LR image to tags of a fixed vocabulary.

Network: the LR image resized to `image_size`^2 -> 4 strided 3x3 convs (GroupNorm, GELU) ->
global average + max pooling -> linear head over the vocabulary (one logit per tag).
Its training loop lives in the trainer (`linearsr tagger train`); this module gives it
`Tagger(vocab)`, `loss(lr, tag_lists)`, `predict(...)` and save/load (safetensors + JSON) so a
bundle can carry it (manifest["tagger"] names the .safetensors file)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from linearsr.model.bundle import read_json, save_safetensors_atomic, write_json_atomic
from linearsr.model.tags import normalize_tags


def build_vocab(tag_lists: Iterable[Iterable[str]], max_size: int = 256, min_count: int = 2) -> list[str]:
    """The most frequent normalised tags (at least `min_count` occurrences), most frequent first."""
    counts = Counter(t for tags in tag_lists for t in normalize_tags(tags, 10**6))
    return [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count][:max_size]


class Tagger(nn.Module):
    def __init__(self, vocab: list[str], width: int = 32, image_size: int = 64):
        super().__init__()
        vocab = normalize_tags(vocab, len(vocab))
        if not vocab:
            raise ValueError("the tagger needs a non-empty tag vocabulary; are there tags in the shards?")
        if width < 4 or image_size < 16:
            raise ValueError(f"tagger width must be >= 4 and image_size >= 16, got {width}, {image_size}")
        self.vocab, self.width, self.image_size = vocab, width, image_size
        self.index = {t: i for i, t in enumerate(vocab)}
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], len(vocab))

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """lr: [B, 3, h, w] in [0, 1] (any size) -> logits [B, V]."""
        x = F.interpolate(lr.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        h = self.features((x - 0.5) / 0.25)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))

    def targets(self, tag_lists: list[list[str]]) -> torch.Tensor:
        """Multi-hot [B, V]; tags outside the vocabulary are ignored."""
        y = torch.zeros(len(tag_lists), len(self.vocab), device=self.head.weight.device)
        for b, tags in enumerate(tag_lists):
            for t in normalize_tags(tags, 10**6):
                if t in self.index:
                    y[b, self.index[t]] = 1.0
        return y

    def loss(self, lr: torch.Tensor, tag_lists: list[list[str]]) -> torch.Tensor:
        """Mean binary cross-entropy over batch and vocabulary (scalar)."""
        if len(tag_lists) != lr.shape[0]:
            raise ValueError(f"got {len(tag_lists)} tag lists for {lr.shape[0]} images")
        return F.binary_cross_entropy_with_logits(self(lr), self.targets(tag_lists))

    @torch.no_grad()
    def predict(self, lr: torch.Tensor, max_tags: int = 8, threshold: float = 0.5) -> list[list[str]]:
        """lr: [B, 3, h, w] -> per image, the tags with probability >= threshold, most likely
        first, at most max_tags."""
        was_training = self.training
        self.eval()
        probs = torch.sigmoid(self(lr.to(self.head.weight.device)))
        self.train(was_training)
        out = []
        for row in probs:
            order = torch.argsort(row, descending=True)[:max_tags]
            out.append([self.vocab[i] for i in order.tolist() if row[i] >= threshold])
        return out

    def save(self, prefix: str | Path) -> Path:
        """Write PREFIX.safetensors (weights) + PREFIX.json (vocab and sizes); returns the weights path."""
        prefix = Path(str(prefix).removesuffix(".safetensors"))
        weights = prefix.with_name(prefix.name + ".safetensors")
        save_safetensors_atomic(weights, self.state_dict(), {"kind": "linearsr-tagger"})
        write_json_atomic(prefix.with_name(prefix.name + ".json"),
                          {"kind": "tagger", "vocab": self.vocab, "width": self.width, "image_size": self.image_size})
        return weights

    @classmethod
    def load(cls, path: str | Path) -> "Tagger":
        weights = Path(path)
        if weights.suffix != ".safetensors":
            weights = weights.with_name(weights.name + ".safetensors")
        meta = read_json(weights.with_suffix(".json"), "tagger metadata")
        if "vocab" not in meta:
            raise ValueError(f"tagger metadata {str(weights.with_suffix('.json'))!r} has no 'vocab'")
        tagger = cls(meta["vocab"], width=meta.get("width", 32), image_size=meta.get("image_size", 64))
        if not weights.is_file():
            raise FileNotFoundError(f"tagger weights {str(weights)!r} do not exist")
        state = load_file(str(weights))
        try:
            tagger.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"tagger weights {str(weights)!r} do not fit its metadata: {str(e).splitlines()[0]}") from None
        return tagger.eval()
