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


@pytest.fixture
def single_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


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
