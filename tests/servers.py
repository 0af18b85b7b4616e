"""Servers the tests start themselves, on 127.0.0.1 only: a moto S3 server, a Ray head."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import secrets
import subprocess
import sys
import time
import signal
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

LOOPBACK = "127.0.0.1"
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, seconds: float = 60.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 - loopback only
            return
        except urllib.error.HTTPError:
            return  # it answered
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def fsspec_options(self) -> dict:
        return {
            "key": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def polars_options(self) -> dict:
        return {
            "aws_endpoint_url": self.endpoint,
            "aws_access_key_id": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "aws_region": "us-east-1",
            "aws_allow_http": "true",
        }

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=name)


def _moto_server(extra_env: dict[str, str] | None = None) -> Iterator[S3Server]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(extra_env or {})},
    )
    endpoint = f"http://{LOOPBACK}:{port}"
    try:
        wait_for_http(endpoint + "/moto-api/")
        yield S3Server(endpoint)
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server in its own process on a free loopback port (any credentials pass)."""
    yield from _moto_server()


@pytest.fixture(scope="session")
def s3_server_checking_credentials() -> Iterator[S3Server]:
    """A moto S3 server that checks credentials from the first request: unknown keys are refused."""
    yield from _moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})


@dataclass(frozen=True)
class RayHead:
    gcs_address: str
    dashboard_url: str
    env: dict


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """`ray start --head --block` on loopback ports, 2 CPUs, in its own process group, so that
    stopping it ends only its processes (not another Ray of the same test session).

    Token auth on, as cluster/README.md's local multi-node commands (2c) start a cluster: RAY_AUTH_MODE=token and
    a fresh RAY_AUTH_TOKEN in the environment of the head and of every client (no token file)."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port, dashboard_port = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("rayhead")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_ADDRESS", None)
    command = [
        ray_cli, "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={port}",
        f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
        "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        # fixed defaults (52365, ...) clash with another Ray on the machine, e.g. the tests' local one
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    dashboard = f"http://{LOOPBACK}:{dashboard_port}"
    try:
        wait_for_http(dashboard + "/api/version", seconds=180)
        yield RayHead(f"{LOOPBACK}:{port}", dashboard, env)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=30)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job_submit(head: RayHead, working_dir: Path, entrypoint: list[str], timeout: float = 480) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir DIR -- ENTRYPOINT` against ``head``; retried while the
    head's job agent is still starting ("No available agent")."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**head.env, "RAY_ADDRESS": head.dashboard_url}
    command = [ray_cli, "job", "submit", "--working-dir", str(working_dir), "--", *entrypoint]
    deadline = time.time() + 300  # on a busy 2-core box the agent took more than 120 s once
    while True:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in result.stdout + result.stderr or time.time() > deadline:
            return result
        time.sleep(3)


def _descendants(root_pid: int) -> set[int]:
    """``root_pid`` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of /proc/net/tcp{,6}: little-endian 32-bit words in hex."""
    words = bytes.fromhex(hex_address)
    packed = b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4))
    return ipaddress.ip_address(packed)


def listening_addresses(root_pid: int) -> set[str]:
    """IP addresses that ``root_pid`` and its descendants hold listening TCP sockets on (Linux)."""
    inodes = set()
    for pid in _descendants(root_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            listening = fields[3] == "0A"
            if listening and fields[9] in inodes:
                address = _address(fields[1].split(":")[0])
                mapped = getattr(address, "ipv4_mapped", None)
                addresses.add(str(mapped or address))
    return addresses
