"""The DeepSpeed engine settings: learning-rate schedule and ZeRO config (the engine itself is
exercised in tests/integration/test_train_engine.py)."""

import os

import pytest

from linearsr.trainer.config import load_config
from linearsr.trainer.engine import deepspeed_config, lr_factor

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "cpu_tiny.toml")


def test_warmup_then_cosine_down_to_min_lr():
    f = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone after warmup
    assert lr_factor(500, 100, 10, "cosine", 0.1) == pytest.approx(0.1)  # past the budget: stays at min
    assert {lr_factor(s, 100, 0, "constant", 0.1) for s in range(0, 100, 7)} == {1.0}


def test_deepspeed_config_follows_the_train_config():
    cfg = load_config(TINY, ["deepspeed.zero_stage=3", "optim.ema_decay=0", "deepspeed.precision=bf16", "optim.grad_accum=4",
                             "optim.grad_clip=0.5", "data.batch_size=6"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (6, 4, 0.5)
