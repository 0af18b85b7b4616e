"""Fan the planned units out as Ray tasks: bounded in-flight work, retries, progress.

The executor knows nothing of the science, nor of the kinds of unit: it submits
``plan.work()`` in order through the library's ``run_unit``, and a unit that waits on another
(a pt-reference STIR shard on its pretrained inversion) takes that unit's ObjectRef as an
argument, so Ray starts it only once the other has finished.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import ray
from ray.exceptions import RayTaskError
from tqdm import tqdm

from invariance.config import ResourcesConfig
from invariance.engine.execute import ExecuteSummary
from invariance.engine.plan import Plan
from invariance.engine.steps import RunSpec, Workspace, run_unit
from invariance.errors import StorageError
from invariance.io.layout import Unit

log = logging.getLogger(__name__)

# How long the driver waits on the shards in flight before it looks at the lease again.
WAIT_SECONDS = 15.0

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
def unit_task(spec: RunSpec, unit: Unit, *dependencies: Any) -> str:
    """One unit of work in a Ray worker; ``dependencies`` are ObjectRefs Ray waits on first."""
    return run_unit(spec, unit, _process_workspace(spec))


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
        log.warning("resources.num_gpus is %s but the cluster has no GPU now: shards wait until the autoscaler "
                    "adds GPU nodes (stop with Ctrl-C or `ray job stop`)", resources.num_gpus)  # fmt: skip
    options = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "max_retries": resources.max_retries,
        "retry_exceptions": [StorageError],
    }
    spec_ref = ray.put(spec)
    submitted: dict[Unit, ray.ObjectRef] = {}
    queue = plan.work()
    summary = ExecuteSummary()
    started = time.time()
    in_flight: dict[ray.ObjectRef, Unit] = {}
    bar = tqdm(total=len(queue), desc="shards", unit="shard", disable=not progress or not queue,
               mininterval=1.0, dynamic_ncols=True)  # fmt: skip
    position = 0
    while position < len(queue) or in_flight:
        if lease_lost is not None and not summary.stopped_early and lease_lost():
            summary.stop("lost the run lease (another run took it over, or it could not be renewed); "
                         "the next run computes the rest")  # fmt: skip
            bar.write(f"stopping: {summary.stop_reason}")
        # recomputed as the cluster grows: an autoscaler adds nodes only for work it sees waiting
        limit = default_max_in_flight(resources)
        while position < len(queue) and len(in_flight) < limit and not summary.stopped_early:
            unit, dependencies = queue[position]
            waits_on = [submitted[d] for d in dependencies if d in submitted]
            submitted[unit] = unit_task.options(**options).remote(spec_ref, unit, *waits_on)
            in_flight[submitted[unit]] = unit
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
            was_stopped = summary.stopped_early
            message = summary.add_failure(unit, _root_cause(error))
            bar.write(f"FAILED {unit}: {message.splitlines()[0] if message else ''}")
            if summary.stopped_early and not was_stopped:
                bar.write(f"stopping: {summary.stop_reason}")
        bar.update(1)
        bar.set_postfix(done=summary.completed, failed=len(summary.failures), refresh=False)
    bar.close()
    summary.seconds = time.time() - started
    return summary
