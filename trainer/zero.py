"""DeepSpeed's side of a checkpoint: which of its files a rank reads, reading them without
unpickling code, and consolidating any ZeRO stage / world size into one fp32 state dict.

Files of `engine.save_checkpoint(dir, tag="ds")`: ds/mp_rank_00_model_states.pt (module weights,
LR schedule, client state; ZeRO-3 writes one zero_pp_rank_R_mp_rank_00_model_states.pt per
rank instead) and ds/zero_pp_rank_R_mp_rank_00_optim_states.pt (rank R's optimizer partition),
plus `latest` and DeepSpeed's zero_to_fp32.py script."""

from __future__ import annotations

import contextlib
import io
import os
import re
from unittest import mock

import torch

from linearsr.trainer.checkpoint import META, TAG

_RANK_FILE = re.compile(r"(?:^|/)(?:zero_pp_rank_|state_rank)(\d+)[_.]")


def rank_needs(rel: str, rank: int, same_world: bool) -> bool:
    """Whether `rank` reads checkpoint file `rel` on resume. Same world size: its own partitions and
    state plus the shared files. After a world-size change (DeepSpeed 0.19 cannot re-partition a
    ZeRO optimizer) rank 0 consolidates every shard into weights that the others get by broadcast."""
    m = _RANK_FILE.search(rel)
    if same_world:
        return m is None or int(m.group(1)) == rank
    return rel == META or (rank == 0 and not rel.startswith("state_rank"))


def _name_the_accelerator() -> None:
    """Before DeepSpeed's first import: it warns when it has to guess (`linearsr export` on a CPU box)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def _ds_safe_globals() -> list:
    """The plain-data DeepSpeed classes inside ZeRO optimizer files (no code runs to rebuild them)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyTorch:
    """`torch` as DeepSpeed's checkpoint readers see it, except that `load` never unpickles code."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=None, weights_only=None, **_):
        with torch.serialization.safe_globals(_ds_safe_globals()):
            return torch.load(f, map_location=map_location, mmap=bool(mmap), weights_only=True)


@contextlib.contextmanager
def weights_only_loads():
    """While active, DeepSpeed reads checkpoint files with torch.load(weights_only=True): a
    tampered checkpoint in storage cannot run code (its data classes are allow-listed)."""
    _name_the_accelerator()
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine
    from deepspeed.utils import zero_to_fp32

    safe = _WeightsOnlyTorch()
    with mock.patch.object(zero_to_fp32, "torch", safe), mock.patch.object(torch_checkpoint_engine, "torch", safe):
        yield


def consolidate(local_dir: str) -> dict[str, torch.Tensor]:
    """One fp32 state dict of the LinearSR weights from a local checkpoint folder of any ZeRO stage
    and world size (DeepSpeed's zero_to_fp32)."""
    _name_the_accelerator()
    from deepspeed.utils import zero_to_fp32

    ds_dir = os.path.join(local_dir, TAG)
    if not os.path.isdir(ds_dir):
        raise FileNotFoundError(f"{local_dir} has no DeepSpeed shards ({TAG}/)")
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):  # its prints and progress bar
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(local_dir, tag=TAG)
    prefix = "model."
    return {k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}


def load_weights(ckpt_url: str, local_dir: str, ema: bool | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, "ema" | "raw") of a complete checkpoint, its files verified against COMPLETE:
    the EMA weights when `ema` is True, or None and the checkpoint has them; else the raw ones,
    consolidated from the shards of any ZeRO stage and world size. Only the files needed are read."""
    from safetensors.torch import load_file

    from linearsr.trainer import checkpoint as ckpt

    has_ema = ckpt.EMA_FILE in ((ckpt.read_marker(ckpt_url) or {}).get("files") or {})
    if ema and not has_ema:
        raise FileNotFoundError(f"checkpoint {ckpt_url} has no EMA weights (the run had optim.ema_decay = 0)")
    use_ema = has_ema if ema is None else ema
    wanted = (lambda rel: rel == ckpt.EMA_FILE) if use_ema else (lambda rel: rel.startswith(TAG + "/"))
    local, problems = ckpt.fetch(ckpt_url, local_dir, keep=wanted)
    if problems:
        raise ValueError(f"checkpoint {ckpt_url} does not match its {ckpt.MARKER} list ({'; '.join(problems[:3])}); "
                         "use an earlier one")
    if use_ema:
        return load_file(os.path.join(local, ckpt.EMA_FILE)), "ema"
    return consolidate(local), "raw"
