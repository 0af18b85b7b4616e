"""Ctrl-C and SIGTERM during `invariance run` (issue 13.11): the driver stops submitting,
releases its lease, and exits 130 / 143 with one line: no traceback, no native stack dump.
A real `invariance run` in a subprocess, on the local Ray it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from invariance.io.layout import MANIFESTS
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_exits_with_one_line_and_releases_its_lease(tmp_path: Path, signum: int, code: int) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2, 3])
    write_eval_parquet(tmp_path / "data")
    raw = tiny_config(tmp_path, str(tmp_path / "out"), inversion={"iterations": 60, "step_size": 0.5})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "run", str(tmp_path / "run.yaml"), "--no-progress"],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    records = tmp_path / "out" / MANIFESTS
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            if records.exists() and len([p for p in records.rglob("*.json") if "leases" not in p.parts]) >= 3:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the run finished before it could be interrupted"
        assert list((records / "leases").glob("*.json")), "the run holds no lease"
        driver.send_signal(signum)  # the driver only, as `kill` or a scheduler would
        _, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "*** SIG" not in stderr, stderr[-3000:]
    interrupted = [line for line in stderr.splitlines() if "interrupted" in line]
    assert interrupted == [f"invariance run: interrupted ({signal.Signals(signum).name}): stopped; what finished is "
                           "kept, the next run computes the rest"]  # fmt: skip
    assert "Token authentication is enabled" not in stderr  # the local Ray's token auth, said explicitly
    assert not list((records / "leases").glob("*.json"))  # released: a rerun starts at once
    done = len([p for p in records.rglob("*.json") if "leases" not in p.parts])
    assert done < 6 + 36 + 3  # it stopped: not every unit ran
