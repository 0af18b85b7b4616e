"""How GPU memory is shared out: auto micro-batches from a probe, capped by the process's share
of the device, and Ray tasks with fractional GPUs holding their workers to that share."""

from __future__ import annotations

import pytest
import torch

from invariance.config import ResourcesConfig
from invariance.inversion import MICRO_BATCH_MEMORY_FRACTION, gpu_bytes_free_to_process, micro_batch_for_memory
from invariance.steps import Workspace
from jobs.execute import gpu_memory_share

GIB = 2**30


def test_micro_batch_for_memory_takes_its_share_of_the_free_memory():
    assert micro_batch_for_memory(10 * 2**20, 1000 * 2**20) == int(MICRO_BATCH_MEMORY_FRACTION * 100)
    assert micro_batch_for_memory(10 * 2**20, 5 * 2**20) == 1  # never zero: one sample at a time
    assert micro_batch_for_memory(10 * 2**20, -GIB) == 1
    assert micro_batch_for_memory(0, 5 * 2**20) >= 1


def test_free_memory_counts_the_processs_own_unused_cache():
    # 80 GiB device, 50 free; this process reserved 20 and uses 5: 15 of its cache is free to it
    free = gpu_bytes_free_to_process(free_on_device=50 * GIB, total=80 * GIB, reserved=20 * GIB, allocated=5 * GIB,
                                     process_share=1.0)  # fmt: skip
    assert free == 65 * GIB


def test_free_memory_is_capped_by_the_processs_share():
    # a quarter of an 80 GiB GPU, 5 GiB in use: 15 left, however much the device has free
    free = gpu_bytes_free_to_process(free_on_device=79 * GIB, total=80 * GIB, reserved=6 * GIB, allocated=5 * GIB,
                                     process_share=0.25)  # fmt: skip
    assert free == 15 * GIB
    over = gpu_bytes_free_to_process(free_on_device=79 * GIB, total=80 * GIB, reserved=30 * GIB, allocated=25 * GIB,
                                     process_share=0.25)  # fmt: skip
    assert over == 0


@pytest.mark.parametrize(("num_gpus", "share"), [(0, 1.0), (0.25, 0.25), (0.5, 0.5), (1, 1.0), (2, 1.0)])
def test_a_tasks_memory_share_is_its_gpu_fraction(num_gpus, share):
    assert gpu_memory_share(ResourcesConfig(num_gpus=num_gpus)) == share


def test_workspace_holds_a_cuda_process_to_its_share(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, device: calls.append((share, device)))
    Workspace(device="cuda", gpu_memory_share=0.25)
    assert calls == [(0.25, torch.device("cuda"))]
    Workspace(device="cuda", gpu_memory_share=1.0)  # a whole GPU: the allocator's default
    Workspace(device="cpu", gpu_memory_share=0.25)  # no GPU: nothing to hold
    assert len(calls) == 1


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_workspace_rejects_a_share_outside_zero_one(share):
    with pytest.raises(ValueError, match="gpu_memory_share"):
        Workspace(device="cpu", gpu_memory_share=share)
