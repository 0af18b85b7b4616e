"""Fault scenarios that need a Ray of their own, run as `python -m tests.fault_scenarios NAME DIR`.

Each prints one JSON line on stdout with what the test asserts on.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from invariance.io.layout import StirUnit
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet


def _records(out: Path) -> int:
    return len(list((out / "_manifests").rglob("*.json"))) if out.exists() else 0


def node_loss(folder: Path) -> dict:
    """A 3-node local cluster (head without CPUs, 2 workers); one worker is removed mid-run."""
    import ray
    from ray.cluster_utils import Cluster

    from invariance.config import parse_config
    from jobs.run import run

    write_checkpoints(folder / "ckpt", epochs=[1, 2])
    write_eval_parquet(folder / "data")
    raw = tiny_config(folder, str(folder / "out"), inversion={"iterations": 120, "step_size": 0.5},
                      resources={"num_cpus": 1, "max_retries": 5},
                      compaction={"enabled": False})  # fmt: skip  # the scenario counts each raw shard file
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    results: list = []
    thread = threading.Thread(target=lambda: results.append(run(parse_config(raw), progress=False)))
    thread.start()
    deadline = time.time() + 300
    while _records(folder / "out") < 6 and time.time() < deadline and thread.is_alive():
        time.sleep(0.1)
    removed_at = _records(folder / "out")
    cluster.remove_node(workers[0])
    thread.join(timeout=600)
    result = results[0]
    shard_files = [p.relative_to(folder / "out").as_posix() for p in (folder / "out" / "stir").rglob("*.parquet")]
    ray.shutdown()
    cluster.shutdown()
    return {
        "removed_after_records": removed_at,
        "failures": result.execution.failures,
        "completed": result.execution.completed,
        "expected_stir": len(result.plan.of_type(StirUnit)),
        "stir_files": len(shard_files),
        "unique_stir_files": len(set(shard_files)),
        "complete_epochs": result.reduced.complete_epochs,
    }


SCENARIOS = {"node_loss": node_loss}

if __name__ == "__main__":
    name, folder = sys.argv[1], Path(sys.argv[2])
    print(json.dumps(SCENARIOS[name](folder)), flush=True)
