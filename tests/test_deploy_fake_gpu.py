"""A fake-GPU rehearsal of a cluster run on this CPU-only machine: a two-node Ray on 127.0.0.1,
a head without GPUs (the driver) and a worker node that advertises 2 GPUs (`ray start
--num-gpus 2` on CPU), then the guide's `ray job submit` (docs/clusters.md) with `resources.num_gpus: 0.5`. Ray
places every shard on the worker and assigns it a GPU id, CUDA is absent, nothing crashes, and
the run's summary says the shards ran on CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import polars as pl
import pytest

from tests.helpers import write_job_dir
from tests.servers import LOOPBACK, RayHead, free_port, ray_job_submit, wait_for_http

pytestmark = pytest.mark.slow


# Two Ray nodes on one host, on 127.0.0.1 only: `ray start` refuses to add a second node while
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the switch that keeps Ray on loopback), so Ray's own
# multi-node test harness starts them: a head with 1 CPU and no GPU (the driver), and a node
# with 2 CPUs and 2 GPUs, as `ray start --num-cpus 2 --num-gpus 2` would.
CLUSTER_SCRIPT = """
import signal, sys, threading
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args=dict(
    num_cpus=1, num_gpus=0, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[1])))
cluster.add_node(num_cpus=2, num_gpus=2)
cluster.wait_for_nodes()
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
print("up", cluster.address, flush=True)
done.wait()
cluster.shutdown()
"""


@pytest.fixture
def fake_gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    dashboard_port = free_port()
    errors = tmp_path_factory.mktemp("fakegpu") / "cluster.err"
    with errors.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT, str(dashboard_port)], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=sink, start_new_session=True)  # fmt: skip
    try:
        line = process.stdout.readline()  # "up <gcs address>" once both nodes are registered
        assert line.startswith("up "), f"the two-node Ray did not start: {errors.read_text()[-3000:]}"
        dashboard = f"http://{LOOPBACK}:{dashboard_port}"
        wait_for_http(dashboard + "/api/version", seconds=180)
        yield RayHead(line.split()[1], dashboard, env)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_fake_gpu_cluster_runs_every_shard_on_cpu(tmp_path: Path, fake_gpu_cluster: RayHead) -> None:
    job_dir = write_job_dir(tmp_path, epochs=[1, 2], seeds=[0], resources={"num_cpus": 1, "num_gpus": 0.5})
    # the guide's command (docs/clusters.md): ray job submit --working-dir . -- invariance run run.yaml
    submitted = ray_job_submit(fake_gpu_cluster, job_dir, ["invariance", "run", "run.yaml", "--no-progress"])
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    assert "computed 19/19 units" in log and "0 failed" in log, log[-4000:]
    # every unit ran on a worker that Ray gave a GPU id, and each said it computed on CPU
    assert "shards ran on cpu (Ray assigned a GPU, CUDA is not available): 19 units" in log, log[-4000:]
    curves = pl.read_parquet(tmp_path / "out" / "reduced" / "curves.parquet")
    assert sorted(curves["epoch"].unique()) == [1, 2]
    assert curves["forgetting_mean"].is_not_null().all()
