"""bench_memory.py: the storage tracker counts what a caching allocator would, fake tensors give
the same peak as real ones, and the auto micro-batch the library would pick bounds the peak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from invariance.config import ModelConfig
from invariance.core.models import load_model
from tests.helpers import BENCH, TINY_MODEL, load_bench_module

pytestmark = pytest.mark.usefixtures("torch_single_thread")

memory = load_bench_module("bench_memory")
MIB = 2**20


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return load_model(ModelConfig(**TINY_MODEL), None)


def test_tracker_counts_live_storages_once_and_rounds_to_allocator_blocks():
    base = torch.zeros(1000)  # 4000 bytes: one 4096-byte block
    tracker = memory.PeakMemory()
    tracker.track([base, base[:10]])  # a view of a tracked tensor is the same storage
    assert tracker.current == 4096
    with tracker:
        doubled = base * 2  # a new 4096-byte block
        view = doubled.view(10, 100)  # no allocation
        doubled.add_(1)  # in place: no allocation
        small = torch.ones(3)  # 12 bytes: one 512-byte block
        assert tracker.current == 4096 + 4096 + 512
        del doubled, view
        assert tracker.current == 4096 + 512
        again = base + 1
    assert tracker.peak == 4096 + 4096 + 512
    assert tracker.current == 4096 + 4096 + 512 and again.numel() == 1000 and small.numel() == 3


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_fake_tensors_give_the_peak_real_tensors_give(tiny_model, mode):
    settings = dict(layer=tiny_model.depth, samples=6, micro_batch=None, mode=mode, device_bytes=2**30, reserve_bytes=0)
    fake = memory.inversion_peak(tiny_model, fake=True, **settings)
    real = memory.inversion_peak(tiny_model, fake=False, **settings)
    assert fake == real
    assert fake.micro_batch == 6 and fake.fits


def test_bf16_peaks_lower_than_fp32(tiny_model):
    settings = dict(layer=tiny_model.depth, samples=64, micro_batch=64, device_bytes=2**30, reserve_bytes=0)
    fp32 = memory.inversion_peak(tiny_model, mode="fp32", **settings)
    bf16 = memory.inversion_peak(tiny_model, mode="bf16", **settings)
    assert bf16.peak_gib < fp32.peak_gib


def test_auto_micro_batch_bounds_the_peak_on_a_small_device(tiny_model):
    """A device too small for all samples at once: auto chunks, and the peak stays inside it."""
    whole = memory.inversion_peak(tiny_model, tiny_model.depth, 256, 256, "fp32", device_bytes=2**30, reserve_bytes=0)
    resident = int(whole.model_and_inputs_gib * 2**30)
    device = resident + int(whole.peak_mib_per_sample * MIB * 40)  # room for ~40 samples' steps
    auto = memory.inversion_peak(tiny_model, tiny_model.depth, 256, None, "fp32", device_bytes=device, reserve_bytes=0)
    assert 1 < auto.micro_batch < 256
    assert auto.fits and whole.fits  # whole: in 1 GiB; auto: in the small device
    assert auto.peak_gib * 2**30 <= device < whole.peak_gib * 2**30


def test_bench_memory_script_reports_and_fails_when_it_does_not_fit(tmp_path):
    kwargs = json.dumps(TINY_MODEL["kwargs"])
    out = tmp_path / "memory.json"
    args = [sys.executable, str(BENCH / "bench_memory.py"), "--arch", TINY_MODEL["arch"], "--model-kwargs", kwargs,
            "--samples", "32", "--reserve-gib", "0"]  # fmt: skip
    fits = subprocess.run([*args, "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert fits.returncode == 0, fits.stderr
    assert "| fp32" in fits.stdout and "| bf16" in fits.stdout and "yes (" in fits.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["fp32", "bf16"] and all(r["micro_batch"] == 32 for r in results)
    too_small = subprocess.run([*args, "--device-gib", "0.0001"], capture_output=True, text=True, timeout=120)
    assert too_small.returncode == 1 and "NO (" in too_small.stdout
