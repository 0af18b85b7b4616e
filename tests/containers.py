"""A container engine for the image test, started by the tests: Debian's dockerd on its own socket
(never the machine's default one), its base image from a registry when one answers, else the
stand-in that docker/base-standin.sh makes from the Debian mirror."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOCKET_DIR = Path("/tmp/invariance-dockerd")
# layers persist between test sessions on one machine (a rebuild after a code change is seconds)
DATA_ROOT = Path("/var/lib/invariance-docker")
STANDIN = "invariance/base-standin:py311"


@dataclass(frozen=True)
class Engine:
    env: dict[str, str]  # DOCKER_HOST pointing at our socket

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
        return result

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0


def _ping(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """dockerd on /tmp/invariance-dockerd/docker.sock (started here unless one already answers there)."""
    missing = [tool for tool in ("docker", "dockerd", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the image test needs {missing} (`make container-engine` installs Debian's docker.io and debootstrap)")
    SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DOCKER_HOST": f"unix://{SOCKET_DIR / 'docker.sock'}"}
    process = None
    if not _ping(env):
        log = open(SOCKET_DIR / "dockerd.log", "ab")
        process = subprocess.Popen(
            ["dockerd", f"--host={env['DOCKER_HOST']}", f"--data-root={DATA_ROOT}", f"--exec-root={SOCKET_DIR / 'exec'}",
             f"--pidfile={SOCKET_DIR / 'dockerd.pid'}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 120
        while not _ping(env):
            if process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"dockerd did not start; its log: {(SOCKET_DIR / 'dockerd.log').read_text()[-3000:]}")
            time.sleep(1)
    try:
        yield Engine(env)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def base_image(engine: Engine, wanted: str) -> str:
    """``wanted`` (the Dockerfile's default base) when the engine has it or a registry serves it,
    else the Debian stand-in (made once per engine by docker/base-standin.sh)."""
    if engine.has_image(wanted):
        return wanted
    if engine.run("pull", wanted, check=False, timeout=120).returncode == 0:
        return wanted
    if not engine.has_image(STANDIN):
        made = subprocess.run(["bash", str(ROOT / "docker" / "base-standin.sh"), STANDIN], env=engine.env,
                              capture_output=True, text=True, timeout=1200)  # fmt: skip
        assert made.returncode == 0, f"docker/base-standin.sh failed:\n{made.stderr[-4000:]}"
    return STANDIN
