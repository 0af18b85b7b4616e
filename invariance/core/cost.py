"""What an inversion costs: floating-point operations, measured by torch's flop counter, and
the inversion throughput of this CPU (timed once per CPU, torch and thread count, then cached)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from invariance.config import TokenPolicy
from invariance.core.models import FeatureModel


def inversion_step_flops(
    model: FeatureModel, layer: int, token_policy: TokenPolicy = "flatten", image_size: int | None = None
) -> int:
    """FLOPs of one inversion iteration for one image: forward to ``layer`` and the input
    gradient back (no parameter gradients), as counted on a ``[1, 3, S, S]`` input; S is
    ``image_size`` (``data.image_size``: what the run feeds the model) or the model's input size."""
    size = image_size or model.input_size
    device = model.mean.device
    image = torch.rand(1, 3, size, size, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        output = model.layer_features(image, [layer], token_policy)[layer]
        torch.autograd.grad(output.float().norm(), image)
    return int(counter.get_total_flops())


def inversion_flops(
    model: FeatureModel, layer: int, n_samples: int, iterations: int, token_policy: TokenPolicy = "flatten",
    image_size: int | None = None,
) -> int:  # fmt: skip
    """FLOPs of a whole inversion: ``iterations`` steps plus the final evaluation, n samples of
    ``image_size`` (default: the model's input size)."""
    return inversion_step_flops(model, layer, token_policy, image_size) * n_samples * (iterations + 1)


# ---- how fast this CPU inverts: measured once per (CPU, torch, threads, workload), then cached ----

CPU_THROUGHPUT_FILE = "cpu_throughput.json"


def cpu_name() -> str:
    """This machine's CPU as the kernel names it (``AMD EPYC 7763 64-Core Processor``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "an unnamed CPU"


def throughput_cache() -> Path:
    """Where measured CPU throughputs are kept: ``$XDG_CACHE_HOME/invariance`` (default
    ``~/.cache/invariance``)/cpu_throughput.json."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "invariance" / CPU_THROUGHPUT_FILE


@dataclass(frozen=True)
class CpuThroughput:
    """Inversion GFLOP/s of one task on this CPU with ``threads`` threads, and how it is known."""

    gflops: float
    cpu: str
    threads: int
    torch_version: str
    measured: str  # the date it was measured
    cached: bool  # read from the cache (else measured now)
    path: Path

    def describe(self) -> str:
        # a figure timed while the machine was busy stays low: deleting the file times it again
        how = f"cached in {self.path}" if self.cached else f"measured now, cached in {self.path}"
        return (f"measured on {self.cpu} ({plural_threads(self.threads)}, torch {self.torch_version}, "
                f"{self.measured}; {how})")  # fmt: skip


def plural_threads(threads: int) -> str:
    return f"{threads} thread{'' if threads == 1 else 's'} per task"


def cpu_throughput_key(workload: str, threads: int) -> str:
    """The cache key: the CPU, torch's version, the threads and what was timed (the model)."""
    return f"{cpu_name()} | torch {torch.__version__} | {threads} threads | {workload}"


def time_inversion_steps(
    model: FeatureModel, layer: int, batch: int, threads: int, token_policy: TokenPolicy = "flatten",
    image_size: int | None = None, budget_seconds: float = 2.0,
) -> float:  # fmt: skip
    """Inversion GFLOP/s of ``model`` at ``layer`` on this CPU with ``threads`` threads: steps
    (forward to the layer, input gradient back) on ``[batch, 3, S, S]``, after one warm-up step,
    the fastest of up to 3 within about ``budget_seconds`` (the least disturbed by other work)."""
    size = image_size or model.input_size
    image = torch.rand(batch, 3, size, size, requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)

    def step() -> float:
        began = time.perf_counter()
        output = model.layer_features(image, [layer], token_policy)[layer]
        torch.autograd.grad(output.float().norm(), image)
        return time.perf_counter() - began

    try:
        spent = step()  # warm-up: allocations, kernel selection
        best = math.inf
        for _ in range(3):
            best = min(best, step())
            spent += best
            if spent > budget_seconds:
                break
    finally:
        torch.set_num_threads(before)
    return inversion_step_flops(model, layer, token_policy, image_size) * batch / best / 1e9


def cpu_throughput(
    model: FeatureModel, layer: int, workload: str, threads: int = 1, batch: int = 8,
    token_policy: TokenPolicy = "flatten", image_size: int | None = None, cache: Path | None = None,
) -> CpuThroughput:  # fmt: skip
    """This CPU's inversion GFLOP/s per task for ``workload`` (a name of the model and input that
    ``model``, ``layer``, ``image_size`` time): read from the cache when this CPU, torch and thread
    count measured it before, else timed now (a few seconds) and cached. An unwritable cache
    only means the next call times it again."""
    path = cache or throughput_cache()
    key = cpu_throughput_key(workload, threads)
    try:
        entries = json.loads(path.read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):
        entries = {}
    if isinstance(entries, dict) and isinstance(entry := entries.get(key), dict) and entry.get("gflops", 0) > 0:
        return CpuThroughput(float(entry["gflops"]), cpu_name(), threads, torch.__version__,
                             str(entry.get("measured", "undated")), True, path)  # fmt: skip
    gflops = time_inversion_steps(model, layer, batch, threads, token_policy, image_size)
    measured = datetime.date.today().isoformat()
    entries = entries if isinstance(entries, dict) else {}
    entries[key] = {"gflops": round(gflops, 3), "measured": measured}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps({"entries": entries}, indent=1, sort_keys=True))
        os.replace(partial, path)
    except OSError:
        pass
    return CpuThroughput(gflops, cpu_name(), threads, torch.__version__, measured, False, path)


def duration(seconds: float) -> str:
    """``42 s``, ``3 m 10 s``, ``2 h 05 m``, ``3.5 days``: a person's reading of a time span."""
    if seconds < 1:
        return f"{seconds:.2g} s"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} m {int(seconds % 60):02d} s"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} m"
    return f"{seconds / 86400:.1f} days"
