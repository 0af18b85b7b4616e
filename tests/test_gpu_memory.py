"""How GPU memory is shared out: auto micro-batches from a probe, capped by the process's share
of the device, and Ray tasks with fractional GPUs holding their workers to that share."""

from __future__ import annotations

import pytest
import torch

from invariance.config import InversionConfig, ResourcesConfig
from invariance.core.inversion import (
    MICRO_BATCH_MEMORY_FRACTION,
    gpu_bytes_free_to_process,
    invert,
    measured_micro_batch,
    micro_batch_for_memory,
)
from invariance.engine.steps import Workspace
from jobs.execute import gpu_memory_share

GIB = 2**30


def test_micro_batch_for_memory_takes_its_share_of_the_free_memory():
    assert MICRO_BATCH_MEMORY_FRACTION == 0.6  # the figures below are worked out for 0.6
    assert micro_batch_for_memory(10 * 2**20, 1000 * 2**20) == 60  # 600 MiB of 1000 free, 10 MiB a sample
    assert micro_batch_for_memory(3 * 2**20, 100 * 2**20) == 20  # 60 MiB / 3 MiB
    assert micro_batch_for_memory(10 * 2**20, 5 * 2**20) == 1  # never zero: one sample at a time
    assert micro_batch_for_memory(10 * 2**20, -GIB) == 1
    assert micro_batch_for_memory(0, 5 * 2**20) == 3 * 2**20  # a probe that measured nothing: 1 byte a sample


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

    def set_fraction(share, device):
        # torch's own check: the device must carry an index ("cuda" alone is refused)
        calls.append((share, torch.cuda._utils._get_device_index(device, optional=False)))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    Workspace(device="cuda", gpu_memory_share=0.25)
    Workspace(device="cuda:1", gpu_memory_share=0.5)
    assert calls == [(0.25, 0), (0.5, 1)]
    Workspace(device="cuda", gpu_memory_share=1.0)  # a whole GPU: the allocator's default
    Workspace(device="cpu", gpu_memory_share=0.25)  # no GPU: nothing to hold
    assert len(calls) == 2


@pytest.mark.parametrize(("share", "expected"), [(1.0, int(0.6 * 79 * GIB // (100 * 2**20))),
                                                 (0.25, int(0.6 * 19 * GIB // (100 * 2**20)))])  # fmt: skip
def test_measured_micro_batch_reads_the_probe_peak_and_the_share(monkeypatch, tiny_vit, share, expected):
    """The CUDA sizing's wiring, with torch.cuda's memory calls scripted (the probe runs for real):
    the probe peaks 100 MiB per sample above 1 GiB in use; 50 GiB of 80 are free on the device
    and 29 more are this process's unused cache; a quarter share caps it at 20 - 1 GiB."""
    images = torch.rand(8, 3, 32, 32)
    noise = torch.randn(8, 3, 32, 32)
    cuda = {
        "synchronize": lambda device: None,
        "reset_peak_memory_stats": lambda device: None,
        "memory_allocated": lambda device: 1 * GIB,
        "max_memory_allocated": lambda device: 1 * GIB + 4 * 100 * 2**20,
        "mem_get_info": lambda device: (50 * GIB, 80 * GIB),
        "memory_reserved": lambda device: 30 * GIB,
        "get_per_process_memory_fraction": lambda device: share,
    }
    for name, fake in cuda.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    config = InversionConfig(iterations=10, bf16=False)
    assert measured_micro_batch(tiny_vit, 2, "flatten", images, noise, config) == expected


def test_empty_inversion_returns_empty_results(tiny_vit):
    result = invert(tiny_vit, 1, torch.rand(0, 3, 32, 32), torch.randn(0, 3, 32, 32), InversionConfig(bf16=False))
    assert result.images.shape == (0, 3, 32, 32) and result.final_loss.shape == (0,) and result.iterations_run == 0


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_workspace_rejects_a_share_outside_zero_one(share):
    with pytest.raises(ValueError, match="gpu_memory_share"):
        Workspace(device="cpu", gpu_memory_share=share)
