"""LinearSR: a linear-attention flow-matching model for image super-resolution, and the
distributed system that trains it (Ray + DeepSpeed), picks its knee checkpoint and
fine-tunes one expert per log-SNR interval.

The Python API for upscaling (linearsr.model.inference), imported on first use:

    from linearsr import Upscaler, upscale
    hr = upscale("runs/demo/bundle", Image.open("photo.png"))"""

__version__ = "0.1.0"

_API = {"Upscaler", "upscale", "load_bundle"}


def __getattr__(name: str):
    if name in _API:  # lazily: `linearsr --version` and the other commands do not import torch for it
        from linearsr.model import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'linearsr' has no attribute {name!r}")
