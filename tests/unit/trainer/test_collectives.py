"""The trainer's collectives run on the process group's device: NCCL rejects CPU tensors, so a
GPU run would stop at its first validation otherwise. "meta" stands in for a CUDA device here:
each collective is recorded (and stopped) before anything would be read back from it."""

import pytest
import torch
import torch.distributed as dist

from linearsr.cluster.launch import process_group_backend
from linearsr.model.flow import FlowConfig
from linearsr.trainer import collectives
from linearsr.trainer.validate import collect, evaluate

DEVICE = torch.device("meta")


class Recorded(Exception):
    pass


@pytest.fixture
def recorder(monkeypatch):
    seen = []

    def record(t, *args, **kwargs):
        seen.append(t.device)
        raise Recorded

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for name in ("all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, record)
    return seen


class Engine:
    class module:
        training = False

    def eval(self):
        pass

    def train(self, mode=True):
        pass


@pytest.mark.parametrize("call", [
    lambda: evaluate(Engine(), [], FlowConfig(), None, DEVICE),
    lambda: collect([], None, 1, {}, DEVICE),
    lambda: collectives.all_sum([1.0, 2.0], DEVICE),
    lambda: collectives.all_min([1.0], DEVICE),
    lambda: collectives.broadcast_tensors({"w": torch.zeros(2)}, DEVICE),
], ids=["validation", "val-batch-count", "sum", "min", "broadcast"])
def test_every_collective_uses_the_device_it_is_given(recorder, call):
    with pytest.raises(Recorded):
        call()
    assert recorder == [DEVICE]


def test_a_gpu_run_gets_a_group_for_cuda_and_cpu_tensors():
    assert process_group_backend(use_gpu=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(use_gpu=False) == "gloo"
