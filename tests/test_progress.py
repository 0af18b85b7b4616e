"""Progress a log can show without a bar (`invariance run --no-progress`, `ray job logs`): a line
per checkpoint whose units are all done, and one at least every minute while none is."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from invariance.config import parse_config
from invariance.core.cost import duration
from invariance.engine.execute import ProgressLines, execute_in_process
from invariance.engine.plan import make_plan
from invariance.engine.steps import RunSpec, Workspace
from invariance.io.layout import InversionUnit, PointUnit, StirUnit
from invariance.io.storage import Store
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stir(epoch: int, layer: int, run: str = "") -> StirUnit:
    return StirUnit(epoch, "ft", layer, 0, f"epoch={epoch:02d}", f"file:///ckpt/{run}/epoch={epoch:02d}.safetensors", run=run)


def test_a_line_per_checkpoint_when_its_last_unit_is_done_and_one_a_minute_otherwise():
    queue = [(InversionUnit(0, 0), ()), (stir(3, 0), ()), (stir(3, 1), ()), (PointUnit("cka", 3, "epoch=03", stir(3, 0).checkpoint_url), ()),
             (stir(4, 0), ())]  # fmt: skip
    clock, lines = Clock(), []
    progress = ProgressLines(queue, lines.append, interval=60.0, clock=clock)
    clock.now += 12
    progress.done(queue[0][0])
    assert lines == ["pretrained model complete (1/5 units, 12 s)"]
    progress.done(queue[1][0])
    clock.now += 59
    progress.tick()  # 59 s since the last line: nothing yet
    assert len(lines) == 1
    clock.now += 1
    progress.tick()
    assert lines[-1] == "2/5 units, 1 m 12 s; working on the checkpoint epoch=03"
    progress.tick()  # the minute starts again with every line
    assert len(lines) == 2
    clock.now += 118
    progress.done(queue[2][0], failed=True)
    progress.done(queue[3][0])
    assert lines[-1] == "checkpoint epoch=03 finished with 1 failed units (4/5 units, 1 failed, 3 m 10 s)"
    progress.done(queue[4][0])
    assert lines[-1] == "checkpoint epoch=04 complete (5/5 units, 1 failed, 3 m 10 s)"
    clock.now += 600
    progress.tick()  # all done: no more lines
    assert len(lines) == 4


def test_a_study_names_the_run_of_a_checkpoint():
    queue = [(stir(1, 0, run="lr=0.1"), ()), (stir(1, 0, run="lr=0.01"), ())]
    lines: list[str] = []
    progress = ProgressLines(queue, lines.append, clock=Clock())
    progress.done(queue[1][0])
    assert lines == ["checkpoint lr=0.01/epoch=01 complete (1/2 units, 0 s)"]


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (0.04, 9.94, 42, 190, 3599, 3600 + 125, 5 * 86400)] == \
        ["0.04 s", "9.9 s", "42 s", "3 m 10 s", "59 m 59 s", "1 h 02 m", "5.0 days"]  # fmt: skip


def test_the_ticker_writes_while_a_long_unit_runs():
    """The in-process executor waits on one unit at a time: a thread says it is still working."""
    import time

    lines: list[str] = []
    progress = ProgressLines([(stir(1, 0), ())], lines.append, interval=0.05)
    with progress.ticking(every=0.01):
        time.sleep(0.3)
    assert lines and lines[0].startswith("0/1 units,") and lines[0].endswith("working on the checkpoint epoch=01")


def _tiny_plan(tmp_path: Path, output: str):
    config = parse_config(tiny_config(tmp_path, str(tmp_path / output), seeds=[0], layers=[1],
                                      inversion={"iterations": 2, "step_size": 0.5}))  # fmt: skip
    store = Store(config.output)
    plan = make_plan(config, store)
    return plan, RunSpec.from_plan(config, store, plan)


def test_the_in_process_executor_says_when_each_checkpoint_is_complete(tmp_path: Path, caplog):
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    plan, spec = _tiny_plan(tmp_path, "out")
    lines: list[str] = []
    summary = execute_in_process(plan, spec, Workspace("cpu"), progress=lines.append)
    assert summary.failures == [] and summary.completed == len(plan.all_units())
    complete = [line.split(" (")[0] for line in lines if " complete (" in line]
    assert complete == ["pretrained model complete", "checkpoint epoch=01 complete", "checkpoint epoch=02 complete"]
    assert lines[-1].startswith(f"checkpoint epoch=02 complete ({summary.completed}/{summary.completed} units, ")
    # by default the lines are log records (the command shows them on stderr)
    plan, spec = _tiny_plan(tmp_path, "out2")
    with caplog.at_level(logging.INFO, logger="invariance.engine.execute"):
        execute_in_process(plan, spec, Workspace("cpu"))
    assert "checkpoint epoch=02 complete" in caplog.text
