"""Through the real `ray job submit` against `ray start --head` on loopback ports."""

from __future__ import annotations

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
    assert "computed 17/17 units" in log, log[-4000:]  # 3 pt inversions + 2 x 2 x 3 STIR + 2 CKA
