"""ModelConfig: every knob of the LinearSR network, validated on construction.

Two presets: `cpu_tiny` (tests and the CPU demo: a training step at batch 8 on 96x96 HR crops
takes well under 0.3 s on 2 cores) and `base` (~0.6B parameters, SANA-600M-shaped, for GPUs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

AUTOENCODERS = ("pixel", "latent")
ATTENTION_BACKENDS = ("torch", "sdpa", "fla", "fused")
MIXERS = ("linear", "gla_bidir")
TAG_ENCODERS = ("hash", "minilm")


@dataclass(frozen=True)
class ModelConfig:
    """The network. Space: images in [-1, 1] are encoded by the autoencoder (pixel-unshuffle by
    `ae_factor`, or a diffusers autoencoder from `ae_path`); with `residual` the flow models
    x0 = (enc(HR) - enc(bicubic(LR))) * residual_scale, so a zero prediction is bicubic."""

    scale: int = 4  # super-resolution factor (HR = LR * scale)
    autoencoder: Literal["pixel", "latent"] = "pixel"
    ae_factor: int = 4  # pixel-unshuffle factor (pixel autoencoder only)
    ae_path: str = ""  # local diffusers AutoencoderKL / AutoencoderDC folder (latent only)
    residual: bool = True  # model HR - bicubic(LR) instead of HR
    residual_scale: float = 10.0  # std of the x4 residual of real photos in [-1, 1] is ~0.1
    patch_size: int = 1
    width: int = 64
    depth: int = 4
    heads: int = 2
    mlp_ratio: float = 2.5
    attention: Literal["torch", "sdpa", "fla", "fused"] = "torch"
    mixer: Literal["linear", "gla_bidir"] = "linear"
    attention_eps: float = 1e-6
    time_freq_dim: int = 256  # sinusoidal features of t before the shared time MLP
    tag_encoder: Literal["hash", "minilm"] = "minilm"  # frozen MiniLM + learned projection; hash: learned rows
    tag_vocab_size: int = 4096  # hash buckets
    tag_set: tuple[str, ...] = ()  # the tags seen in training (the trainer fills it from its tag source)
    novel_tag_cosine: float = 0.5  # minilm: a tag below this cosine to every tag_set tag is logged once
    max_tags: int = 8
    tag_dropout: float = 0.1  # probability of dropping a sample's tags in train() (for CFG)
    cross_attn_every: int = 1  # blocks i % k == 0 have tag cross-attention; 0 = none (then tag_pool)
    tag_pool: bool = False  # a gated pooled tag embedding added to the time modulation of every block

    def __post_init__(self):
        def need(ok: bool, field: str, what: str):
            if not ok:
                raise ValueError(f"model.{field} {what}, got {getattr(self, field)!r}")

        need(self.scale >= 1, "scale", "must be an integer >= 1")
        need(self.autoencoder in AUTOENCODERS, "autoencoder", f"must be one of {AUTOENCODERS}")
        need(self.ae_factor >= 1, "ae_factor", "must be >= 1")
        if self.autoencoder == "latent":
            need(bool(self.ae_path), "ae_path", "must name a local diffusers autoencoder folder when model.autoencoder='latent'")
        need(self.residual_scale > 0, "residual_scale", "must be > 0")
        need(self.patch_size >= 1, "patch_size", "must be >= 1")
        need(self.width >= 8, "width", "must be >= 8")
        need(self.depth >= 1, "depth", "must be >= 1")
        need(self.heads >= 1 and self.width % self.heads == 0, "heads", f"must be >= 1 and divide model.width={self.width}")
        need(self.mlp_ratio > 0, "mlp_ratio", "must be > 0")
        need(self.attention in ATTENTION_BACKENDS, "attention", f"must be one of {ATTENTION_BACKENDS}")
        need(self.mixer in MIXERS, "mixer", f"must be one of {MIXERS}")
        need(self.attention_eps > 0, "attention_eps", "must be > 0")
        need(self.time_freq_dim >= 2 and self.time_freq_dim % 2 == 0, "time_freq_dim", "must be an even number >= 2")
        need(self.tag_encoder in TAG_ENCODERS, "tag_encoder", f"must be one of {TAG_ENCODERS}")
        need(self.tag_vocab_size >= 1, "tag_vocab_size", "must be >= 1")
        object.__setattr__(self, "tag_set", tuple(self.tag_set))  # a JSON list reads back equal
        need(all(isinstance(t, str) and t for t in self.tag_set), "tag_set", "must be a list of non-empty tag strings")
        need(-1.0 <= self.novel_tag_cosine <= 1.0, "novel_tag_cosine", "must be a cosine in [-1, 1]")
        need(self.cross_attn_every >= 0, "cross_attn_every", "must be >= 0 (0 = no tag cross-attention)")
        need(self.cross_attn_every > 0 or self.tag_pool, "cross_attn_every",
             "= 0 leaves the tags no effect unless model.tag_pool = true (set it, or cross_attn_every >= 1)")
        need(self.max_tags >= 0, "max_tags", "must be >= 0")
        need(0.0 <= self.tag_dropout <= 1.0, "tag_dropout", "must be in [0, 1]")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a JSON dict (e.g. a checkpoint's metadata); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**d)

    def diff(self, other: "ModelConfig") -> list[str]:
        """Fields that differ, as 'name: self -> other'."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


PRESETS: dict[str, ModelConfig] = {
    # ~0.2M params: one token per LR pixel (pixel-unshuffle 4, patch 1).
    "cpu_tiny": ModelConfig(width=64, depth=4, heads=2, mlp_ratio=2.5, ae_factor=4, patch_size=1),
    # SANA-600M-like: width 1152, 28 blocks, head dim 32, Mix-FFN x2.5. Parameters (num_params, MiniLM
    # tags): 588.9M = Mix-FFN 280.5M + linear attention 148.7M + tag cross-attention 148.8M (25 %) +
    # 10.9M rest (tag projection 0.44M). cross_attn_every=4: 477.2M, cross-attention 37.2M (8 %);
    # cross_attn_every=0 with tag_pool: 441.4M, tags 1.8M.
    "base": ModelConfig(width=1152, depth=28, heads=36, mlp_ratio=2.5, ae_factor=4, patch_size=2, max_tags=32),
}
