"""`invariance submit` without a cluster: what a tick says for each answer of Ray's job API (a fake
client), and a --runtime-env it cannot read. The real job API: tests/test_job_submit.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.job_submission
import yaml

from jobs import run as run_module
from jobs.cli import main
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0])))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    return path


def fake_client(status: str | None, submitted: list) -> type:
    class Client:
        def __init__(self, address: str) -> None:
            pass

        def get_job_info(self, job_id: str):
            if status is None:
                raise RuntimeError(f"Job {job_id} does not exist")
            return SimpleNamespace(status=SimpleNamespace(value=status))

        def submit_job(self, **kwargs) -> str:
            submitted.append(kwargs)
            return kwargs["submission_id"]

    return Client


@pytest.mark.parametrize("status,code", [(None, 0), ("PENDING", 3), ("RUNNING", 3), ("SUCCEEDED", 3), ("FAILED", 1), ("STOPPED", 1)])
def test_what_a_tick_does_for_each_state_of_its_job(config: Path, monkeypatch, capsys, status, code) -> None:
    submitted: list = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", fake_client(status, submitted))
    assert main(["submit", str(config)]) == code
    out, err = capsys.readouterr()
    if code == 0:
        (job,) = submitted
        assert out.strip() == job["submission_id"] and job["entrypoint"] == f"invariance run {config} --no-progress"
    elif code == 3:
        assert err.strip().endswith(f"is already submitted ({status}); nothing submitted") and not submitted
    else:
        assert f"ended {status} without finishing a shard" in err and "ray job delete" in err and not submitted


def test_a_runtime_env_file_it_cannot_read_is_named(config: Path, tmp_path: Path, capsys) -> None:
    assert main(["submit", str(config), "--runtime-env", str(tmp_path / "missing.yaml")]) == 2
    assert "--runtime-env" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert main(["submit", str(config), "--runtime-env", str(tmp_path / "list.yaml")]) == 2
    assert "a runtime_env is a mapping" in capsys.readouterr().err
