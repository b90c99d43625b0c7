"""One real DeepSpeed engine in this process (world size 1, gloo, ZeRO-2): gradient accumulation,
the warmup + cosine schedule and EMA weights, without Ray."""

import math
import os

import pytest
import torch

from linearsr.trainer.config import load_config
from linearsr.trainer.engine import lr_factor

pytestmark = pytest.mark.integration

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cpu_tiny.toml")


@pytest.fixture(scope="module")
def single_process_group(tmp_path_factory):
    """One gloo world of size 1 for the module (DeepSpeed caches its groups per process)."""
    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_engine_trains_with_accumulation_schedule_and_ema(single_process_group):
    from linearsr.model.network import LinearSR
    from linearsr.trainer.engine import EMA, build_engine, current_lr, grad_norm, init_distributed

    cfg = load_config(TINY, ["optim.grad_accum=2", "optim.warmup_steps=2", "run.steps=4", "optim.ema_decay=0.5",
                             "data.batch_size=2"])
    init_distributed(use_gpu=False)
    torch.manual_seed(0)
    engine, scheduler = build_engine(cfg, LinearSR(cfg.model))
    ema = EMA(engine.module.model, cfg.optim.ema_decay)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    hr, lr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 8, 8)
    lrs, boundaries = [], []
    for _ in range(4):  # 4 micro-batches = 2 optimizer steps
        loss = engine(hr, lr, [["a"], []], torch.tensor([0.3, 0.7])).mean()
        boundaries.append(engine.is_gradient_accumulation_boundary())
        engine.backward(loss)
        engine.step()
        lrs.append(current_lr(engine))
    ema.update(engine.module.model)
    assert boundaries == [False, True, False, True]
    assert math.isfinite(loss.item()) and grad_norm(engine) > 0
    peak = cfg.optim.lr
    assert lrs == pytest.approx([peak * 0.5, peak, peak, peak * lr_factor(2, 4, 2, "cosine", cfg.optim.min_lr / peak)])
    assert any(not torch.equal(before[k], v) for k, v in ema.shadow.items())


def test_bf16_zero3_trains_and_consolidates_to_fp32(single_process_group, tmp_path):
    """The GPU preset's precision, on CPU: bf16 weights in the engine, an fp32 export."""
    from linearsr.model.network import LinearSR
    from linearsr.trainer.checkpoint import TAG
    from linearsr.trainer.engine import build_engine, init_distributed
    from linearsr.trainer.zero import consolidate

    cfg = load_config(TINY, ["deepspeed.precision=bf16", "deepspeed.zero_stage=3", "data.batch_size=2", "optim.ema_decay=0"])
    init_distributed(use_gpu=False)
    engine, _ = build_engine(cfg, LinearSR(cfg.model))
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    hr, lr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 8, 8)
    for _ in range(2):
        loss = engine(hr, lr, [["a"], []], torch.tensor([0.3, 0.7])).mean()
        engine.backward(loss)
        engine.step()
    assert math.isfinite(loss.item())
    engine.save_checkpoint(str(tmp_path), tag=TAG)
    state = consolidate(str(tmp_path))
    model = LinearSR(cfg.model)
    model.load_state_dict(state)
    assert all(v.dtype == torch.float32 for v in state.values()) and len(state) == len(model.state_dict())
