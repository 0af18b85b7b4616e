"""Through the real `ray job submit` against `ray start --head` on loopback ports."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.helpers import write_job_dir
from tests.servers import ray_head, ray_job_submit  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def test_ray_job_submit_runs_the_config(tmp_path: Path, ray_head) -> None:
    job_dir = write_job_dir(tmp_path, epochs=[1, 2], seeds=[0])
    submitted = ray_job_submit(ray_head, job_dir, ["invariance", "run", "run.yaml", "--no-progress"])
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    curves = pl.read_parquet(tmp_path / "out" / "reduced" / "curves.parquet")
    assert sorted(curves["epoch"].unique()) == [1, 2]
    assert "computed 19/19 units" in log, log[-4000:]  # 3 pt inversions + 2 x 2 x 3 STIR + 2 CKA + 2 subspace


def _submit(head, config: Path) -> subprocess.CompletedProcess:
    env = {**head.env, "RAY_ADDRESS": head.dashboard_url}
    return subprocess.run([str(Path(sys.executable).with_name("invariance")), "submit", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _job_status(head, submission_id: str) -> str:
    """`ray job status ID` against ``head`` (its token in the environment): SUCCEEDED, FAILED, STOPPED or RUNNING."""
    env = {**head.env, "RAY_ADDRESS": head.dashboard_url}
    out = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "status", submission_id], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    # Ray's words: "Job 'ID' succeeded" / "failed" / "was stopped", else still pending or running
    found = re.search(rf"Job '{re.escape(submission_id)}' (succeeded|failed|was stopped)", out.stdout + out.stderr)
    return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[found.group(1)] if found else "RUNNING"


def test_a_scheduled_tick_that_finds_its_job_submitted_exits_3_with_one_line(tmp_path: Path, ray_head) -> None:
    """Two ticks: the first submits, the second (its job still starting or running) exits 3 with one
    line; a tick that loses the race between its look and its submit says the same; once the run
    has finished, a tick has nothing to submit."""
    job_dir = write_job_dir(tmp_path, epochs=[1], seeds=[0])
    config = job_dir / "run.yaml"
    first = _submit(ray_head, config)
    assert first.returncode == 0, first.stderr[-3000:]
    submission_id = first.stdout.strip()
    assert submission_id.startswith("invariance-")
    second = _submit(ray_head, config)
    assert second.returncode == 3, second.stderr[-3000:]
    # its job still starting (Ray knows the id) or already running (it holds the run's lease): one line
    said = second.stderr.strip()
    assert said == f"invariance submit: job {submission_id} is already submitted ({said.split('(')[1].split(')')[0]}); " \
        "nothing submitted" or (said.startswith("invariance submit: a run of these settings is in progress: ")
                                and said.endswith("; nothing submitted") and "\n" not in said), said  # fmt: skip
    assert "Traceback" not in second.stderr

    # the race: this tick planned and looked before the other tick submitted (no lease taken yet,
    # no job of that id), and Ray refuses its submit (in a process of its own: the head's token)
    race = (
        "import sys; from ray.job_submission import JobSubmissionClient; from jobs import run; "
        f"run.next_submission = lambda config: ({submission_id!r}, '1 units to compute'); "
        "JobSubmissionClient.get_job_info = lambda self, job_id: (_ for _ in ()).throw(RuntimeError('does not exist')); "
        "done = run.submit(sys.argv[1]); print(done.submitted, done.submission_id); print(done.why)"
    )  # fmt: skip
    raced = subprocess.run([sys.executable, "-c", race, str(config)], env={**ray_head.env, "RAY_ADDRESS": ray_head.dashboard_url},
                           capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert raced.returncode == 0, raced.stderr[-3000:]
    assert raced.stdout.splitlines() == [f"False {submission_id}", f"job {submission_id} is already submitted (by another tick)"]
    deadline = time.time() + 400
    while (status := _job_status(ray_head, submission_id)) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        assert time.time() < deadline, f"job {submission_id} still {status}"
        time.sleep(3)
    assert status == "SUCCEEDED"
    after = _submit(ray_head, config)
    assert after.returncode == 3
    assert after.stderr.strip() == ("invariance submit: nothing to compute: every shard of every checkpoint is done; "
                                    "nothing submitted")  # fmt: skip
