"""Fan the planned units out as Ray tasks: bounded in-flight work, retries, progress.

The executor knows nothing of the science: it submits library steps
(``invariance.steps``) and counts what finished. Pretrained inversions go first; the
pt-reference STIR shards take the inversion's ObjectRef as an argument, so Ray starts
them only once their X' is in the store.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayTaskError
from tqdm import tqdm

from invariance.config import ResourcesConfig
from invariance.errors import ConfigError, DataError, InvarianceError, StorageError
from invariance.layout import CkaUnit, InversionUnit, StirUnit
from invariance.plan import Plan
from invariance.steps import RunSpec, Workspace, run_cka, run_inversion, run_stir

# How long the driver waits on the shards in flight before it looks at the lease again.
WAIT_SECONDS = 15.0
# Errors that every remaining unit would hit too: stop submitting after the first.
FATAL_ERRORS = (ConfigError, DataError, StorageError)

_workspace: Workspace | None = None


def gpu_memory_share(resources: ResourcesConfig) -> float:
    """A task's part of its GPU's memory: its fraction of the GPU when Ray packs several on one."""
    return min(1.0, resources.num_gpus) if resources.num_gpus > 0 else 1.0


def _process_workspace(spec: RunSpec) -> Workspace:
    """One Workspace per Ray worker process: models and features stay loaded between tasks."""
    global _workspace
    if _workspace is None:
        _workspace = Workspace(gpu_memory_share=gpu_memory_share(spec.config.resources))
    return _workspace


@ray.remote
def inversion_task(spec: RunSpec, unit: InversionUnit) -> str:
    return run_inversion(spec, unit, _process_workspace(spec))


@ray.remote
def stir_task(spec: RunSpec, unit: StirUnit, *dependencies: Any) -> str:
    return run_stir(spec, unit, _process_workspace(spec))


@ray.remote
def cka_task(spec: RunSpec, unit: CkaUnit) -> str:
    return run_cka(spec, unit, _process_workspace(spec))


@dataclass
class ExecuteSummary:
    """What one execution did."""

    submitted: int = 0
    completed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def describe(unit: StirUnit | CkaUnit | InversionUnit) -> str:
    if isinstance(unit, InversionUnit):
        return f"pt inversion layer {unit.ref_layer} seed {unit.seed}"
    if isinstance(unit, CkaUnit):
        return f"cka {unit.checkpoint}"
    return f"stir {unit.checkpoint} {unit.ref_model}[{unit.ref_layer}] seed {unit.seed}"


def _root_cause(error: BaseException) -> BaseException:
    while isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
        error = error.cause
    return error


def default_max_in_flight(resources: ResourcesConfig) -> int:
    """Twice the number of tasks the cluster can run at once, so workers never wait on the driver."""
    if resources.max_in_flight is not None:
        return resources.max_in_flight
    cluster = ray.cluster_resources()
    slots = cluster.get("CPU", 1) / resources.num_cpus
    if resources.num_gpus > 0:
        slots = min(slots, cluster.get("GPU", 0) / resources.num_gpus)
    return max(2, int(2 * max(slots, 1)))


def execute(plan: Plan, spec: RunSpec, progress: bool = True, lease_lost: Callable[[], bool] | None = None) -> ExecuteSummary:
    """Run every missing unit of ``plan``; returns counts and failures (never raises for a unit).

    ``lease_lost``: polled between submissions and at least every WAIT_SECONDS; once true,
    nothing more is submitted (the run lease was taken over or could not be renewed) and what
    is in flight is awaited.
    """
    resources = spec.config.resources
    cluster = ray.cluster_resources()
    if resources.num_gpus > 0 and cluster.get("GPU", 0) == 0:
        print(f"resources.num_gpus is {resources.num_gpus} but the cluster has no GPU now: shards wait until "
              "the autoscaler adds GPU nodes (stop with Ctrl-C or `ray job stop`)", file=sys.stderr)  # fmt: skip
    options = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "max_retries": resources.max_retries,
        "retry_exceptions": [StorageError],
    }
    spec_ref = ray.put(spec)
    inversion_refs: dict[InversionUnit, ray.ObjectRef] = {}

    def submit_inversion(unit: InversionUnit) -> ray.ObjectRef:
        inversion_refs[unit] = inversion_task.options(**options).remote(spec_ref, unit)
        return inversion_refs[unit]

    def submit_stir(unit: StirUnit) -> ray.ObjectRef:
        dependency = inversion_refs.get(InversionUnit(unit.ref_layer, unit.seed)) if unit.ref_model == "pt" else None
        dependencies = [dependency] if dependency is not None else []
        return stir_task.options(**options).remote(spec_ref, unit, *dependencies)

    def submit_cka(unit: CkaUnit) -> ray.ObjectRef:
        return cka_task.options(**options).remote(spec_ref, unit)

    # Inversions first (pt shards wait on them); then checkpoint by checkpoint, so that a worker's
    # cached models and features serve consecutive tasks: ft-reference shards (no dependency),
    # the CKA shard, then the pt-reference shards, whose inversions have had the longest to finish.
    queue: list[tuple[Any, Callable[[Any], ray.ObjectRef]]] = [(u, submit_inversion) for u in plan.missing_inversions]
    missing_stir, missing_cka = plan.missing_stir, plan.missing_cka
    for checkpoint in plan.checkpoints:
        stir = [u for u in missing_stir if u.epoch == checkpoint.epoch]
        queue += [(u, submit_stir) for u in stir if u.ref_model == "ft"]
        queue += [(u, submit_cka) for u in missing_cka if u.epoch == checkpoint.epoch]
        queue += [(u, submit_stir) for u in stir if u.ref_model == "pt"]
    summary = ExecuteSummary()
    started = time.time()
    in_flight: dict[ray.ObjectRef, Any] = {}
    bar = tqdm(total=len(queue), desc="shards", unit="shard", disable=not progress or not queue,
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True)  # fmt: skip
    position = 0
    while position < len(queue) or in_flight:
        if lease_lost is not None and not summary.stopped_early and lease_lost():
            summary.stopped_early = True
            bar.write("stopping: lost the run lease (another run took it over, or it could not be renewed); "
                      "the next run computes the rest")  # fmt: skip
        # recomputed as the cluster grows: an autoscaler adds nodes only for work it sees waiting
        limit = default_max_in_flight(resources)
        while position < len(queue) and len(in_flight) < limit and not summary.stopped_early:
            unit, submit = queue[position]
            in_flight[submit(unit)] = unit
            position += 1
            summary.submitted += 1
        if not in_flight:
            break
        # bounded, so that a lost lease is noticed even while every shard takes minutes
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_SECONDS)
        if not ready:
            continue
        unit = in_flight.pop(ready[0])
        try:
            ray.get(ready[0])
            summary.completed += 1
        except Exception as error:  # noqa: BLE001 - every failure is reported, none is lost
            cause = _root_cause(error)
            message = str(cause) if isinstance(cause, InvarianceError) else f"{type(cause).__name__}: {cause}"
            summary.failures.append((describe(unit), message))
            bar.write(f"FAILED {describe(unit)}: {message.splitlines()[0] if message else ''}")
            if isinstance(cause, FATAL_ERRORS) and not summary.stopped_early:
                summary.stopped_early = True
                bar.write("stopping: this error would repeat for every remaining shard")
        bar.update(1)
        bar.set_postfix(done=summary.completed, failed=len(summary.failures), refresh=False)
    bar.close()
    summary.seconds = time.time() - started
    return summary
