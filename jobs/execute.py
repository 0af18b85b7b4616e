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
from invariance.core.cost import duration
from invariance.engine.execute import PROGRESS_LINE_SECONDS, ExecuteSummary, ProgressLines
from invariance.engine.plan import Plan
from invariance.engine.steps import RunSpec, Workspace, run_unit
from invariance.errors import ConfigError, StorageError
from invariance.io.storage import redact
from invariance.io.layout import Unit

log = logging.getLogger(__name__)

# How long the driver waits on the shards in flight before it looks at the lease again.
WAIT_SECONDS = 15.0
# How long a run on a cluster waits for a node that can take one task (an autoscaler adding it).
NODE_WAIT_SECONDS = 900.0

_workspace: Workspace | None = None


def gpu_memory_share(resources: ResourcesConfig) -> float:
    """A task's part of its GPU's memory: its fraction of the GPU when Ray packs several on one."""
    return min(1.0, resources.num_gpus) if resources.num_gpus > 0 else 1.0


def _process_workspace(spec: RunSpec) -> Workspace:
    """One Workspace per Ray worker process: models and features stay loaded between tasks."""
    global _workspace
    if _workspace is None:
        resources = spec.config.resources
        _workspace = Workspace(gpu_memory_share=gpu_memory_share(resources),
                               inversion_cache_bytes=int(resources.inversion_cache_gb * 1024**3))  # fmt: skip
    return _workspace


def _device_label(workspace: Workspace) -> str:
    """Where this worker computes; says so when Ray assigned it a GPU that CUDA cannot see (a node
    started with --num-gpus but without a driver): the unit then runs on CPU."""
    if workspace.device.type == "cpu" and ray.get_gpu_ids():
        return "cpu (Ray assigned a GPU, CUDA is not available)"
    return workspace.device.type


@ray.remote
def unit_task(spec: RunSpec, unit: Unit, *dependencies: Any) -> tuple[str, str]:
    """One unit of work in a Ray worker; ``dependencies`` are ObjectRefs Ray waits on first.
    Returns the unit's completion record key and the device it ran on."""
    workspace = _process_workspace(spec)
    return run_unit(spec, unit, workspace), _device_label(workspace)


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


def _largest_node() -> tuple[float, float]:
    """(CPUs, GPUs) of the alive node with the most of them, each taken on its own."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    return max((n.get("CPU", 0.0) for n in nodes), default=0.0), max((n.get("GPU", 0.0) for n in nodes), default=0.0)


def _a_node_fits(resources: ResourcesConfig) -> bool:
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    return any(n.get("CPU", 0.0) >= resources.num_cpus and n.get("GPU", 0.0) >= resources.num_gpus for n in nodes)


def check_resources(resources: ResourcesConfig, can_grow: bool, wait_seconds: float = NODE_WAIT_SECONDS,
                    poll_seconds: float = 5.0) -> None:  # fmt: skip
    """Refuse, before any task, what no node can give one task: Ray would wait on it forever.

    On a Ray that cannot grow (the local Ray a run starts) at once; on a cluster, whose
    autoscaler may add a node that fits, after saying what is waited for and waiting at most
    ``wait_seconds``."""
    if _a_node_fits(resources):
        return
    cpus, gpus = _largest_node()
    asked = f"resources.num_cpus {resources.num_cpus:g}, resources.num_gpus {resources.num_gpus:g} per task"
    largest = f"the largest node has {cpus:g} CPUs and {gpus:g} GPUs"
    if not can_grow:
        raise ConfigError(f"{asked}, but {largest} on this local Ray: no task could ever start; "
                          "lower resources.num_cpus / num_gpus")  # fmt: skip
    log.warning("waiting up to %.0f s for a node that fits %s (%s now; an autoscaler may add one; "
                "stop with Ctrl-C or `ray job stop`; or lower resources.num_cpus / resources.num_gpus to what a node "
                "has)", wait_seconds, asked, largest)  # fmt: skip
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))
        if _a_node_fits(resources):
            log.warning("a node that fits the tasks has joined; submitting")
            return
    cpus, gpus = _largest_node()
    raise ConfigError(f"{asked}, but after {wait_seconds:.0f} s the largest node of the cluster has {cpus:g} CPUs "
                      f"and {gpus:g} GPUs: no task could start; lower resources.num_cpus / num_gpus or add "
                      "nodes that fit")  # fmt: skip


def execute(plan: Plan, spec: RunSpec, progress: bool = True, lease_lost: Callable[[], bool] | None = None,
            can_grow: bool = True, run_started: float | None = None) -> ExecuteSummary:  # fmt: skip
    """Run every missing unit of ``plan``; returns counts and failures (never raises for a unit).

    ``progress``: a bar; without it (logs, `--no-progress`) a line per checkpoint whose units are
    all done and one at least every minute otherwise. A line per checkpoint with the bar too.
    ``run_started``: when the run began (time.time()): the time to its first task is printed from it.

    ``lease_lost``: polled between submissions and at least every WAIT_SECONDS; once true,
    nothing more is submitted (the run lease was taken over or could not be renewed) and what
    is in flight is awaited. ``can_grow``: whether an autoscaler may add nodes (a cluster), else
    resources no node has are refused at once (ConfigError). On an interrupt (Ctrl-C, SIGTERM)
    nothing more is submitted and the interrupt goes on; the tasks in flight end with the driver.
    """
    resources = spec.config.resources
    check_resources(resources, can_grow)
    options = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "max_retries": resources.max_retries,
        "retry_exceptions": [StorageError],
    }
    spec_ref = ray.put(spec)
    queue = plan.work()
    summary = ExecuteSummary()
    summary.expect(queue)
    started = time.time()
    bar = tqdm(total=len(queue), desc="shards", unit="shard", disable=not progress or not queue,
               mininterval=1.0, dynamic_ncols=True)  # fmt: skip
    # flushed at once: under `ray job submit` stdout is a pipe, and a line held in a buffer is no progress
    write = bar.write if progress else lambda line: print(line, flush=True)
    lines = ProgressLines(queue, write, interval=float("inf") if progress else PROGRESS_LINE_SECONDS)
    try:
        # Ctrl-C, SIGTERM: submit nothing more. The tasks in flight end with the driver (Ray stops a
        # job's workers when its driver exits); no ray.cancel: a cancel that races a task's reply
        # aborts the driver inside Ray (ray-project/ray#54527), exit 1 in place of 130/143
        _submit_and_wait(queue, options, spec_ref, summary, bar, resources, lease_lost, lines, run_started)
    finally:
        bar.close()
    summary.seconds = time.time() - started
    if summary.devices:
        print(f"shards ran on {summary.describe_devices()}")
    return summary


def _submit_and_wait(
    queue: list, options: dict[str, Any], spec_ref: ray.ObjectRef, summary: ExecuteSummary, bar: tqdm,
    resources: ResourcesConfig, lease_lost: Callable[[], bool] | None, lines: ProgressLines,
    run_started: float | None = None,
) -> None:  # fmt: skip
    in_flight: dict[ray.ObjectRef, Unit] = {}
    submitted: dict[Unit, ray.ObjectRef] = {}
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
            if summary.submitted == 1 and run_started is not None:
                summary.first_task_seconds = time.time() - run_started
                lines.write(f"first task submitted {duration(summary.first_task_seconds)} after the start")
        if not in_flight:
            break
        # bounded, so that a lost lease is noticed even while every shard takes minutes
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_SECONDS)
        lines.tick()
        if not ready:
            continue
        unit = in_flight.pop(ready[0])
        try:
            _, device = ray.get(ready[0])
            summary.completed += 1
            summary.ran_on(device)
            lines.done(unit)
        except Exception as error:  # noqa: BLE001 - every failure is reported, none is lost
            was_stopped = summary.stopped_early
            message = summary.add_failure(unit, _root_cause(error))
            bar.write(redact(f"FAILED {unit}: {message.splitlines()[0] if message else ''}"))
            lines.done(unit, failed=True)
            if summary.stopped_early and not was_stopped:
                bar.write(f"stopping: {summary.stop_reason}")
        bar.update(1)
        bar.set_postfix(done=summary.completed, failed=len(summary.failures), refresh=False)
