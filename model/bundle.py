"""Weights on disk: one expert = `PREFIX.safetensors` + `PREFIX.json`; a bundle = a folder with
`manifest.json` naming the experts, their log-SNR intervals and the shared model config.

manifest.json: {"format": 1, "scale": 4, "model": {...ModelConfig...}, "knee_step": 1200,
                "experts": [{"interval": ["-inf", "-3"], "weights": "e0.safetensors", "val_loss": 0.41}, ...],
                "tagger": "tagger.safetensors" | null,
                "sampling": {"shift": 3.0}  (optional: the training shift of multi-step grids; default 1)}
Interval bounds are written with `flow.format_bound` ("-inf"/"inf" as strings). Never pickles."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from linearsr.core import storage
from linearsr.model.config import ModelConfig
from linearsr.model.flow import Interval, check_partition, format_bound, parse_bound
from linearsr.model.network import LinearSR
from linearsr.model.sampler import MoE

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
OWN_FIELDS = ("format", "scale", "model", "knee_step", "experts", "tagger")  # what write_bundle sets itself


def _interval_of(value: Any) -> Interval:
    if isinstance(value, Interval):
        return value
    if isinstance(value, str):
        return Interval.parse(value)
    lo, hi = value
    return Interval(parse_bound(str(lo)), parse_bound(str(hi)))


def save_expert(prefix: str | Path, model: LinearSR, meta: dict[str, Any] | None = None) -> Path:
    """Write PREFIX.safetensors (weights) and PREFIX.json ({"model": config, "step", "interval",
    "val_loss", ...meta}). Returns the .safetensors path."""
    prefix = Path(str(prefix).removesuffix(".safetensors"))
    meta = dict(meta or {})
    if "interval" in meta and meta["interval"] is not None:
        meta["interval"] = _interval_of(meta["interval"]).key
    weights = prefix.with_name(prefix.name + ".safetensors")
    storage.write_safetensors(str(weights), model.state_dict(), {"format": str(FORMAT_VERSION)})
    storage.write_json(str(prefix.with_name(prefix.name + ".json")), {"format": FORMAT_VERSION, "model": model.cfg.to_dict(), **meta})
    return weights


def read_expert_meta(weights: str | Path) -> dict[str, Any]:
    """The JSON beside an expert's .safetensors (readable without building the model)."""
    weights = Path(weights)
    return storage.read_json(str(weights.with_suffix(".json")), "expert metadata", raw=True)


def _load_weights(model: LinearSR, weights: Path) -> LinearSR:
    if not weights.is_file():
        raise FileNotFoundError(f"expert weights {str(weights)!r} do not exist")
    state = load_file(str(weights))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("wrong shape " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5]))
        raise ValueError(f"weights {str(weights)!r} do not fit the model config: {'; '.join(parts)}")
    model.load_state_dict(state)
    return model


def _with_ae_path(cfg: ModelConfig, ae_path: str | None) -> ModelConfig:
    """The config with its latent autoencoder's folder moved to `ae_path` (where this machine keeps it)."""
    if not ae_path:
        return cfg
    if cfg.autoencoder != "latent":
        raise ValueError(f"--ae-path {ae_path}: this bundle works in pixel space (model.autoencoder={cfg.autoencoder!r}); "
                         "it has no latent autoencoder to point at")
    return dataclasses.replace(cfg, ae_path=str(ae_path))


def load_expert(path: str | Path, expect: ModelConfig | None = None, ae_path: str | None = None) -> LinearSR:
    """Build the model from PREFIX.json and load PREFIX.safetensors (eval mode). With `expect`,
    a config that differs is an error naming the fields; `ae_path` replaces model.ae_path."""
    weights = Path(path)
    if weights.suffix != ".safetensors":
        weights = weights.with_name(weights.name + ".safetensors")
    meta = read_expert_meta(weights)
    if "model" not in meta:
        raise ValueError(f"expert metadata {str(weights.with_suffix('.json'))!r} has no 'model' config")
    cfg = ModelConfig.from_dict(meta["model"])
    if expect is not None and cfg != expect:
        raise ValueError(f"expert {str(weights)!r} has a different model config: {'; '.join(expect.diff(cfg))}")
    return _load_weights(LinearSR(_with_ae_path(cfg, ae_path)), weights).eval()


def write_bundle(
    bundle_dir: str | Path,
    experts: list[dict[str, Any]],
    model_config: ModelConfig | dict,
    knee_step: int | None = None,
    tagger: str | None = None,
    scale: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write BUNDLE/manifest.json atomically. `experts`: [{"interval": [lo, hi] | "lo,hi",
    "weights": file name relative to the bundle, "val_loss": x}, ...] sorted by interval and
    covering all log-SNR values. The weight (and tagger) files must already be in the folder.
    `extra`: more top-level fields, e.g. {"sampling": {"shift": 3.0}} (the training shift that
    multi-step grids follow) and the ESGF tree the experts came from; None keeps those of the
    manifest already in the folder, so rewriting a bundle in place (to add a tagger) keeps them."""
    bundle_dir = Path(bundle_dir)
    if extra is None and (bundle_dir / MANIFEST).is_file():
        extra = {k: v for k, v in read_manifest(bundle_dir).items() if k not in OWN_FIELDS}
    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(model_config)
    if scale is not None and scale != cfg.scale:
        raise ValueError(f"bundle scale {scale} differs from the model config's scale {cfg.scale}")
    entries = sorted(
        ({**e, "interval": _interval_of(e["interval"])} for e in experts), key=lambda e: e["interval"]
    )
    check_partition([e["interval"] for e in entries])
    for name in [e["weights"] for e in entries] + ([tagger] if tagger else []):
        if not (bundle_dir / name).is_file():
            raise FileNotFoundError(f"bundle file {str(bundle_dir / name)!r} does not exist; write the weights before the manifest")
    manifest = {
        "format": FORMAT_VERSION,
        "scale": cfg.scale,
        "model": cfg.to_dict(),
        "knee_step": knee_step,
        "experts": [
            {**e, "interval": [format_bound(e["interval"].lo), format_bound(e["interval"].hi)], "weights": str(e["weights"])}
            for e in entries
        ],
        "tagger": tagger,
        **(extra or {}),
    }
    storage.write_json(str(bundle_dir / MANIFEST), manifest)
    return bundle_dir / MANIFEST


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    return storage.read_json(str(Path(bundle_dir) / MANIFEST), "bundle manifest", raw=True)


def load_bundle(path: str | Path, ae_path: str | None = None) -> MoE:
    """A bundle folder (manifest.json) or one expert .safetensors (a 1-expert bundle) -> MoE in
    eval mode; `moe.tagger` is the bundle's tagger or None. The experts share one autoencoder
    (a latent one is loaded once, from `ae_path` when given, else from the config's model.ae_path)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        moe = MoE([load_expert(path, ae_path=ae_path)]).eval()
        moe.shift = float((read_expert_meta(path).get("sampling") or {}).get("shift", 1.0))
        return moe
    if not path.exists():
        raise FileNotFoundError(f"bundle {str(path)!r} does not exist; pass a bundle folder or an expert .safetensors file")
    if not path.is_dir():
        raise ValueError(f"bundle {str(path)!r} is neither a bundle folder nor an expert .safetensors file")
    manifest = read_manifest(path)
    for key in ("model", "experts"):
        if key not in manifest:
            raise ValueError(f"bundle manifest {str(path / MANIFEST)!r} has no {key!r} field")
    cfg = ModelConfig.from_dict(manifest["model"])
    intervals = [_interval_of(e["interval"]) for e in manifest["experts"]]
    experts: list[LinearSR] = []
    for entry in manifest["experts"]:
        weights = path / entry["weights"]
        meta_file = weights.with_suffix(".json")
        if meta_file.is_file():  # the expert's own metadata must agree with the manifest
            own = ModelConfig.from_dict(read_expert_meta(weights).get("model", cfg.to_dict()))
            if own != cfg:
                raise ValueError(f"expert {str(weights)!r} differs from the bundle's model config: {'; '.join(cfg.diff(own))}")
        shared = experts[0].ae if experts else None
        experts.append(_load_weights(LinearSR(_with_ae_path(cfg, ae_path), ae=shared), weights).eval())
    moe = MoE(experts, intervals)
    moe.shift = float((manifest.get("sampling") or {}).get("shift", 1.0))
    if manifest.get("tagger"):
        from linearsr.model.tagger import Tagger

        moe.tagger = Tagger.load(path / manifest["tagger"])
    return moe.eval()
