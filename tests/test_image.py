"""The image as users get it: `make image` builds docker/Dockerfile with a real engine, then, with no
network (`--network none`; an `--internal` network for the cluster, which reaches nothing outside):
a tiny config runs inside it, and a head and a worker container started from it form a Ray cluster
that runs a job submitted from the host with `ray job submit`, token auth on; its reduced tables
equal the in-process executor's.

The slowest test of the suite (the first build downloads the locked CUDA torch, ~3 GB, and takes
minutes; later builds reuse the engine's layers). Where no registry serves the base image
(rayproject/ray), docker/base-standin.sh makes one from the Debian mirror."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from invariance.config import parse_config
from invariance.engine.execute import execute_in_process
from invariance.engine.reduce import reduce_plan
from invariance.engine.steps import Workspace
from tests.containers import ROOT, Engine, base_image, engine  # noqa: F401 - fixture
from tests.helpers import open_in_process, tiny_config, write_checkpoints, write_eval_parquet
from tests.servers import wait_for_http
from tests.test_cluster_configs import dockerfile_arg_defaults
from tests.test_deploy_image import locked_version

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

IMAGE = "invariance:ci"


@pytest.fixture(scope="module")
def built(engine: Engine) -> tuple[Engine, str]:
    """`make image` with the Dockerfile's default base (or the stand-in); returns (engine, build log)."""
    args = dockerfile_arg_defaults()
    wanted = f"rayproject/ray:{args['RAY_VERSION']}-py311-{args['VARIANT']}"
    base = base_image(engine, wanted)
    started = time.time()
    result = subprocess.run(["make", "-C", str(ROOT), "image", f"IMAGE={IMAGE}", f"BASE_IMAGE={base}"],
                            env=engine.env, capture_output=True, text=True, timeout=3000)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"make image failed (base {base}):\n{log[-6000:]}"
    size = engine.run("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout.strip()
    print(f"\nmake image: {time.time() - started:.0f} s, {int(size) / 1e9:.2f} GB, base {base}")
    return engine, log


def test_the_build_checks_itself_and_prints_its_versions(built) -> None:
    engine, log = built
    versions = engine.run("run", "--rm", "--network", "none", IMAGE, "invariance", "--version").stdout
    expected = {"python": r"3\.11\.\d+", "ray": re.escape(locked_version("ray")),
                "torch": re.escape(locked_version("torch")) + r"\S*", "cuda": r"12\.8"}  # fmt: skip
    for name, pattern in expected.items():
        assert re.search(rf"\b{name} {pattern}(\s|$)", versions), f"{name} not {pattern} in {versions!r}"
    built_with = engine.run("run", "--rm", "--network", "none", IMAGE, "cat", "/home/ray/.invariance-build-versions")
    assert built_with.stdout.strip() == versions.strip(), "the build's last step ran the same install"
    if "Using cache" not in log and "CACHED" not in log:  # a fresh build prints it in its log too
        assert versions.strip() in log, "the build's last step prints the same versions line"


@pytest.fixture
def job_folder() -> Iterator[Path]:
    """A folder the containers mount at the same path (they run as uid 1000: world-writable)."""
    folder = Path(tempfile.mkdtemp(prefix="invariance-image-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_job(folder: Path, output: str) -> Path:
    write_checkpoints(folder / "ckpt", epochs=[1, 2])
    write_eval_parquet(folder / "data")
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(folder, output, seeds=[0])))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    return config


def in_process_tables(folder: Path) -> dict[str, pl.DataFrame]:
    """curves and flow of the same config computed here, by the in-process executor."""
    config = parse_config(tiny_config(folder, str(folder / "in-process"), seeds=[0]))
    store, plan, spec = open_in_process(config)
    execute_in_process(plan, spec, Workspace("cpu"))
    plan.refresh(store)
    reduced = reduce_plan(plan, store, make_plots=False)
    return {"curves": reduced.curves, "flow": reduced.flow}


def assert_same_tables(output: Path, expected: dict[str, pl.DataFrame]) -> None:
    for name, frame in expected.items():
        found = pl.read_parquet(output / "reduced" / f"{name}.parquet")
        keys = [c for c in ("run", "epoch", "alpha", "layer", "pt_layer", "ft_layer") if c in frame.columns]
        assert_frame_equal(found.select(frame.columns).sort(keys), frame.sort(keys), check_exact=False, rtol=0, atol=1e-12)


def test_a_tiny_config_runs_inside_the_image_without_network(built, job_folder: Path) -> None:
    engine, _ = built
    config = write_job(job_folder, str(job_folder / "out"))
    result = engine.run("run", "--rm", "--network", "none", "--shm-size=1g", "-v", f"{job_folder}:{job_folder}",
                        IMAGE, "invariance", "run", str(config), "--no-progress", timeout=900)  # fmt: skip
    assert "computed 19/19 units" in result.stdout, result.stdout[-3000:]
    assert_same_tables(job_folder / "out", in_process_tables(job_folder))


def test_a_two_node_cluster_from_the_image_runs_a_job_submitted_from_the_host(built, job_folder: Path) -> None:
    """Head and worker containers on an --internal network (nothing outside reachable), token
    auth on (RAY_AUTH_MODE=token, the token from the environment, as the cluster files do); the
    host submits with `ray job submit` and the same token, as the cluster guide (cluster/README.md) says."""
    engine, _ = built
    config = write_job(job_folder, str(job_folder / "out"))
    network = f"invariance-ci-{secrets.token_hex(4)}"
    token = secrets.token_hex(32)
    auth = ["-e", "RAY_AUTH_MODE=token", "-e", f"RAY_AUTH_TOKEN={token}"]
    common = ["run", "-d", "--network", network, "--shm-size=1g", "-v", f"{job_folder}:{job_folder}", *auth]
    engine.run("network", "create", "--internal", network)
    containers: list[str] = []
    try:
        containers.append(engine.run(*common, "--name", f"{network}-head", IMAGE, "ray", "start", "--head", "--block",
                                     "--port=6379", "--dashboard-host=0.0.0.0", "--num-cpus=0",
                                     "--disable-usage-stats").stdout.strip())  # fmt: skip
        head_ip = engine.run("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", containers[0]).stdout.strip()
        containers.append(engine.run(*common, "--name", f"{network}-worker", IMAGE, "ray", "start", "--block",
                                     f"--address={head_ip}:6379", "--num-cpus=2", "--disable-usage-stats").stdout.strip())  # fmt: skip
        dashboard = f"http://{head_ip}:8265"
        wait_for_http(dashboard + "/api/version", seconds=180)
        env = {**os.environ, "RAY_ADDRESS": dashboard, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        ray_cli = str(Path(sys.executable).with_name("ray"))
        submit = [ray_cli, "job", "submit", "--", "invariance", "run", str(config), "--no-progress"]
        deadline = time.time() + 180
        while True:  # the worker joins and the head's job agent starts a little after the dashboard
            result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            log = result.stdout + result.stderr
            if "No available agent" not in log or time.time() > deadline:
                break
            time.sleep(3)
        assert result.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "computed 19/19 units" in log, log[-4000:]
        # the head has no CPU for tasks (num-cpus 0): every unit ran in the worker container
        assert_same_tables(job_folder / "out", in_process_tables(job_folder))
        refused = subprocess.run([ray_cli, "job", "list"], env={**env, "RAY_AUTH_TOKEN": "wrong" * 8},
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert refused.returncode != 0, "the job API answered a wrong token"
    finally:
        for container in containers:
            engine.run("rm", "-f", container, check=False)
        engine.run("network", "rm", network, check=False)
