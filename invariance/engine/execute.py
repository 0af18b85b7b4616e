"""What executors share, and the plain in-process executor (a loop, no Ray).

An executor takes ``plan.work()`` (units in submission order, each with the units it waits
for), runs each through ``steps.run_unit`` and counts what finished; it knows no unit types
and nothing of the science. ``jobs/execute.py`` is the Ray executor; this loop runs the same
steps in the calling process (tests, notebooks, a debugger).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from invariance.core.cost import duration
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
    # seconds from the run's start to its first unit submitted (None: none submitted, or no start given)
    first_task_seconds: float | None = None

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


# without a progress bar, a line at least this often while units run (seconds)
PROGRESS_LINE_SECONDS = 60.0


def _group(unit: Unit) -> tuple[str, str]:
    """(checkpoint URL, words for it): the checkpoint a unit belongs to (its weight-path points
    included), ``("", "pretrained model")`` for the units of no checkpoint."""
    if not unit.checkpoint_url:
        return "", "pretrained model"
    run = getattr(unit, "run", "")
    return unit.checkpoint_url, f"checkpoint {f'{run}/' if run else ''}{getattr(unit, 'checkpoint', unit.checkpoint_url)}"


class ProgressLines:
    """Progress as lines, for a log without a progress bar (`--no-progress`, `ray job logs`): one
    when every unit of a checkpoint in this execution has finished (``checkpoint epoch=03 complete
    (12/40 units, 3 m 10 s)``), and, while none does, one at least every ``interval`` seconds
    (``tick`` is called often enough: by the executor's loop or ``ticking``). Thread-safe."""

    def __init__(self, queue: list[tuple[Unit, tuple[Unit, ...]]], write: Callable[[str], None],
                 interval: float = PROGRESS_LINE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.write, self.interval, self.clock = write, interval, clock
        self.left: Counter[str] = Counter()
        self.labels: dict[str, str] = {}
        self.failed: Counter[str] = Counter()
        for unit, _ in queue:
            key, label = _group(unit)
            self.left[key] += 1
            self.labels[key] = label
        self.total, self.finished = len(queue), 0
        self.started = self.last_line = clock()
        self._lock = threading.Lock()

    def _say(self, line: str) -> None:
        self.last_line = self.clock()
        self.write(line)

    def _counts(self) -> str:
        failed = sum(self.failed.values())
        return f"{self.finished}/{self.total} units" + (f", {failed} failed" if failed else "") + \
            f", {duration(self.clock() - self.started)}"  # fmt: skip

    def done(self, unit: Unit, failed: bool = False) -> None:
        """``unit`` finished (or failed, or was not attempted): a line if it was its checkpoint's last."""
        key, _ = _group(unit)
        with self._lock:
            self.finished += 1
            self.left[key] -= 1
            self.failed[key] += failed
            if self.left[key] == 0:
                state = "complete" if not self.failed[key] else f"finished with {self.failed[key]} failed units"
                self._say(f"{self.labels[key]} {state} ({self._counts()})")

    def tick(self) -> None:
        """A line when none came for ``interval`` seconds: the counts, and what is being worked on."""
        with self._lock:
            if self.finished >= self.total or self.clock() - self.last_line < self.interval:
                return
            working = next((self.labels[key] for key, left in self.left.items() if left > 0), "")
            self._say(f"{self._counts()}; working on the {working}")

    def ticking(self, every: float = 5.0) -> "_Ticker":
        """A context in which a thread calls ``tick`` every ``every`` seconds (a loop that waits on
        long units cannot)."""
        return _Ticker(self, every)


class _Ticker:
    def __init__(self, lines: ProgressLines, every: float) -> None:
        self.lines, self.every, self.stopped = lines, every, threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress-lines", daemon=True)

    def _loop(self) -> None:
        while not self.stopped.wait(self.every):
            self.lines.tick()

    def __enter__(self) -> ProgressLines:
        if math.isfinite(self.lines.interval):
            self.thread.start()
        return self.lines

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()


def execute_in_process(
    plan: Plan, spec: RunSpec, workspace: Workspace | None = None, lease_lost: Callable[[], bool] | None = None,
    progress: Callable[[str], None] | None = log.info,
) -> ExecuteSummary:
    """Run every missing unit of ``plan`` here, one after the other, in submission order.

    A unit whose dependency failed is not attempted (it is counted as failed). Never raises
    for a unit; ``lease_lost`` is polled before each unit, as the Ray executor does.
    ``progress`` gets ProgressLines' lines (a checkpoint complete, else one a minute); None: no lines."""
    workspace = workspace or Workspace()
    summary = ExecuteSummary()
    started = time.time()
    failed: set[Unit] = set()
    queue = plan.work()
    summary.expect(queue)
    lines = ProgressLines(queue, progress or (lambda line: None), interval=math.inf if progress is None else PROGRESS_LINE_SECONDS)
    with lines.ticking():
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
                lines.done(unit, failed=True)
                continue
            try:
                run_unit(spec, unit, workspace)
                summary.completed += 1
                summary.ran_on(workspace.device.type)
                lines.done(unit)
            except Exception as error:  # noqa: BLE001 - every failure is reported, none is lost
                failed.add(unit)
                message = summary.add_failure(unit, error)
                lines.done(unit, failed=True)
                # one redacted string, not the unit: a handler that fails prints a record's arguments
                # raw ("--- Logging error ---"), and a unit's repr holds its checkpoint URL
                log.error("FAILED %s", redact(f"{unit}: {message.splitlines()[0] if message else ''}"))
                if summary.stopped_early:
                    log.error("stopping: %s", summary.stop_reason)
    summary.seconds = time.time() - started
    return summary
