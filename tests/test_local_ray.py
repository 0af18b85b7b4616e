"""The local Ray that `invariance run` starts for itself: token auth without a token file (a file
would turn token auth on for every later `ray start --head` on the machine), and a named error
with what to try when Ray does not come up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from invariance.errors import ConfigError
from jobs import run as run_module
from jobs.cli import main
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet


@pytest.mark.slow
def test_a_local_run_leaves_no_token_file_behind(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    code = ("from jobs.run import connect_ray; import os, ray; connect_ray(1); "
            "print(os.environ['RAY_AUTH_MODE'], ray.cluster_resources().get('CPU')); ray.shutdown()")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)}, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["token", "1.0"]
    assert not (home / ".ray" / "auth_token").exists(), "the local run wrote ~/.ray/auth_token"


def test_local_ray_auth_keeps_what_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "recorded")  # so that monkeypatch restores the session's value after
        monkeypatch.delenv(name)
    run_module.local_ray_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    monkeypatch.setenv("RAY_AUTH_TOKEN", "mine")
    run_module.local_ray_auth()
    assert os.environ["RAY_AUTH_TOKEN"] == "mine"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run_module.local_ray_auth()
    assert "RAY_AUTH_TOKEN" not in os.environ


def test_ray_failing_to_start_is_one_named_line_and_exit_1(tmp_path: Path, monkeypatch, capsys) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0])))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls = []

    def failing_init(*args, **kwargs):
        calls.append(kwargs)
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")  # fmt: skip

    monkeypatch.setattr(run_module.ray, "init", failing_init)
    monkeypatch.setattr(run_module.ray, "is_initialized", lambda: False)
    assert main(["run", str(config), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(calls) == 2, "tried twice"
    last = err.strip().splitlines()[-1]
    assert last.startswith("invariance run: error: the local Ray did not start, twice (The current node timed out")
    assert "ray stop" in last and "RAY_ADDRESS" in last
    assert "Traceback" not in err


def test_a_foreign_package_named_like_ours_in_the_working_directory_is_refused(tmp_path: Path) -> None:
    """Ray's workers import from the driver's working directory first: a folder `invariance/` or
    `jobs/` with an __init__.py there broke every task (`cannot import name '__version__'`)."""
    for name in ("invariance", "jobs"):
        folder = tmp_path / name / "work"
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text("# a lab's own package\n")
        with pytest.raises(ConfigError, match=rf"holds a Python package '{name}/' that is not this project's"):
            run_module.check_working_directory(folder)
    checkout = tmp_path / "checkout"
    (checkout / "invariance" / "engine").mkdir(parents=True)
    (checkout / "invariance" / "__init__.py").write_text("")
    (checkout / "invariance" / "engine" / "steps.py").write_text("")
    (checkout / "data" / "invariance").mkdir(parents=True)  # no __init__.py: a plain folder, not imported
    run_module.check_working_directory(checkout)  # a checkout of this project: the documented override
    run_module.check_working_directory(checkout / "data")


def test_run_from_a_folder_with_a_foreign_package_exits_2_before_ray_starts(tmp_path: Path, monkeypatch, capsys) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0])))
    (tmp_path / "invariance").mkdir()
    (tmp_path / "invariance" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(run_module.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(run_module.ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    assert main(["run", str(config), "--no-progress"]) == 2
    assert "holds a Python package 'invariance/'" in capsys.readouterr().err
