"""What executors share, and the plain in-process executor (a loop, no Ray).

An executor takes ``plan.work()`` (units in submission order, each with the units it waits
for), runs each through ``steps.run_unit`` and counts what finished; it knows no unit types
and nothing of the science. ``jobs/execute.py`` is the Ray executor; this loop runs the same
steps in the calling process (tests, notebooks, a debugger).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from invariance.engine.plan import Plan
from invariance.engine.steps import RunSpec, Workspace, run_unit
from invariance.errors import ConfigError, DataError, InvarianceError, StorageError
from invariance.io.layout import Unit
from invariance.io.storage import redact

log = logging.getLogger(__name__)

# Errors that every remaining unit would hit too: stop submitting after the first.
FATAL_ERRORS = (ConfigError, DataError, StorageError)
# When this many units failed with one and the same error before any finished, the rest would too
# (unless they all belong to one checkpoint: a corrupt checkpoint fails only its own units).
SAME_ERROR_LIMIT = 3


def describe_error(error: BaseException) -> str:
    """A failure as one message: our errors as they are, anything else with its type."""
    # a URL with credentials (s3://KEY:SECRET@...) in a library's message never reaches a FAILED line
    return redact(str(error) if isinstance(error, InvarianceError) else f"{type(error).__name__}: {error}")


@dataclass
class ExecuteSummary:
    """What one execution did, and why it stopped early if it did."""

    submitted: int = 0
    completed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    stop_reason: str = ""
    # units completed per device they ran on ("cpu", "cuda", or what the executor reports)
    devices: dict[str, int] = field(default_factory=dict)
    # the checkpoint of each failed unit ("" for the pretrained model's units)
    failed_checkpoints: list[str] = field(default_factory=list)
    # how many checkpoints have units in this execution (the executor sets it from the queue)
    checkpoints_queued: int = 0

    def expect(self, queue: list[tuple[Unit, tuple[Unit, ...]]]) -> None:
        """Note what the execution will run (before it starts): how many checkpoints have units."""
        self.checkpoints_queued = len({unit.checkpoint_url for unit, _ in queue} - {""})

    def ran_on(self, device: str) -> None:
        self.devices[device] = self.devices.get(device, 0) + 1

    def describe_devices(self) -> str:
        """``cpu: 73 units`` style: where the completed units ran."""
        return ", ".join(f"{device}: {count} units" for device, count in sorted(self.devices.items())) or "no unit ran"

    def stop(self, reason: str) -> None:
        if not self.stopped_early:
            self.stopped_early, self.stop_reason = True, reason

    def add_failure(self, unit: Unit, error: BaseException) -> str:
        """Record ``unit``'s failure; stops the execution when the rest would fail alike (a fatal
        error type, or the first SAME_ERROR_LIMIT units all failing with one message, unless they
        are all units of one checkpoint while others are queued: those may be fine). Returns the message."""
        message = describe_error(error)
        self.failures.append((str(unit), message))
        self.failed_checkpoints.append(unit.checkpoint_url)
        if isinstance(error, FATAL_ERRORS):
            self.stop("this error would repeat for every remaining shard")
        first_lines = {text.splitlines()[0] if text else "" for _, text in self.failures}
        checkpoints = set(self.failed_checkpoints)
        one_checkpoint_only = len(checkpoints) == 1 and checkpoints != {""} and self.checkpoints_queued > 1
        if (self.completed == 0 and len(self.failures) >= SAME_ERROR_LIMIT and len(first_lines) == 1
                and not one_checkpoint_only):
            self.stop(f"the first {len(self.failures)} shards all failed with the same error; fix its cause and rerun")
        return message


def execute_in_process(
    plan: Plan, spec: RunSpec, workspace: Workspace | None = None, lease_lost: Callable[[], bool] | None = None
) -> ExecuteSummary:
    """Run every missing unit of ``plan`` here, one after the other, in submission order.

    A unit whose dependency failed is not attempted (it is counted as failed). Never raises
    for a unit; ``lease_lost`` is polled before each unit, as the Ray executor does."""
    workspace = workspace or Workspace()
    summary = ExecuteSummary()
    started = time.time()
    failed: set[Unit] = set()
    queue = plan.work()
    summary.expect(queue)
    for unit, dependencies in queue:
        if lease_lost is not None and lease_lost():
            summary.stop("lost the run lease (another run took it over, or it could not be renewed)")
        if summary.stopped_early:
            break
        summary.submitted += 1
        if failed.intersection(dependencies):
            failed.add(unit)
            summary.failures.append((str(unit), "not attempted: a unit it depends on failed"))
            summary.failed_checkpoints.append(unit.checkpoint_url)
            continue
        try:
            run_unit(spec, unit, workspace)
            summary.completed += 1
            summary.ran_on(workspace.device.type)
        except Exception as error:  # noqa: BLE001 - every failure is reported, none is lost
            failed.add(unit)
            message = summary.add_failure(unit, error)
            # one redacted string, not the unit: a handler that fails prints a record's arguments
            # raw ("--- Logging error ---"), and a unit's repr holds its checkpoint URL
            log.error("FAILED %s", redact(f"{unit}: {message.splitlines()[0] if message else ''}"))
            if summary.stopped_early:
                log.error("stopping: %s", summary.stop_reason)
    summary.seconds = time.time() - started
    return summary
