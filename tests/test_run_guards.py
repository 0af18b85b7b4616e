"""The run and reduce commands around the executor, without starting Ray: an empty rerun starts
no Ray (18.3), reduce respects the run lease (13.6), resources no node has are refused (13.8), an
unreadable shard is recomputed in the same run (13.9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from invariance.config import ResourcesConfig, parse_config
from invariance.engine import lease as lease_module
from invariance.engine.execute import execute_in_process
from invariance.engine.lease import RunLease
from invariance.engine.steps import Workspace
from invariance.errors import ConfigError
from invariance.io.layout import REDUCED_CURVES
from jobs import execute as ray_executor
from jobs import run as run_module
from jobs.cli import main as cli_main
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet


def _no_ray(*_args, **_kwargs) -> None:
    raise AssertionError("Ray was started")


def _in_process(plan, spec, progress=True, lease_lost=None, can_grow=True, run_started=None):
    return execute_in_process(plan, spec, Workspace("cpu"), lease_lost=lease_lost)


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0.0)
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0], layers=[0, 2])))
    return path


@pytest.fixture
def finished(config_file: Path, monkeypatch, torch_single_thread) -> Path:
    """The config run to the end, in process (Ray's executor swapped for the in-process one)."""
    monkeypatch.setattr(run_module, "connect_ray", lambda *a, **k: None)
    monkeypatch.setattr(run_module, "execute", _in_process)
    first = run_module.run(str(config_file), progress=False)
    assert first.execution.failures == [] and first.reduced.complete_epochs == [1, 2]
    return config_file


def test_a_rerun_with_nothing_to_compute_starts_no_ray(finished: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(run_module, "connect_ray", _no_ray)
    monkeypatch.setattr(run_module, "execute", _no_ray)
    assert cli_main(["run", str(finished), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "computed 0/0 units" in out and "reduced 2 complete checkpoints" in out


def test_an_unreadable_shard_is_recomputed_by_the_same_run(finished: Path, capsys) -> None:
    config, _, plan, _ = run_module.open_run(str(finished))
    shard = Path(config.output) / plan.data_key(next(u for u in plan.units["cka"] if u.epoch == 2))
    shard.write_bytes(b"PAR1 truncated")
    # a reduce reads a shard when its checkpoint's shards change or the tables are rebuilt (the
    # reduced tables were made from it when it was whole): rebuilt here, as after a new release
    (Path(config.output) / "reduced" / "index.json").unlink()
    result = run_module.run(str(finished), progress=False)
    assert [str(u) for u in result.reduced.unreadable] == []  # the second reduce found them all readable
    assert result.execution.completed == 1 and result.reduced.complete_epochs == [1, 2]
    assert "1 shards were unreadable: recomputing them" in capsys.readouterr().err


def test_reduce_writes_nothing_while_a_run_holds_the_lease(finished: Path, capsys) -> None:
    config, store, plan, _ = run_module.open_run(str(finished))
    (Path(config.output) / REDUCED_CURVES).unlink()
    live = RunLease(store, plan.settings_hash)
    assert live.acquire(renew_in_background=False) is None
    try:
        assert cli_main(["reduce", str(finished)]) == 0
        err = capsys.readouterr().err
        assert f"a run of these settings is in progress: {live.holder} on" in err and "reduce wrote nothing" in err
        assert not (Path(config.output) / REDUCED_CURVES).exists()
    finally:
        live.release()
    assert cli_main(["reduce", str(finished)]) == 0
    assert (Path(config.output) / REDUCED_CURVES).exists()
    assert not store.exists(f"_manifests/leases/settings={plan.settings_hash}.json")  # released


def test_a_run_starting_during_a_reduce_says_a_reduce_holds_the_lease(finished: Path, monkeypatch, capsys) -> None:
    _, store, plan, _ = run_module.open_run(str(finished))
    seen = {}

    def reduce_and_look(plan_, store_, **options):
        seen["holder"] = RunLease(store_, plan_.settings_hash).current()
        return reduce_plan(plan_, store_, **options)

    from invariance.engine.reduce import reduce_plan

    monkeypatch.setattr(run_module, "reduce_plan", reduce_and_look)
    assert run_module.reduce_only(str(finished)) is not None
    assert seen["holder"].holder.startswith("reduce-")


NODES = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]


def test_resources_no_node_has_are_refused_on_a_local_ray(monkeypatch) -> None:
    monkeypatch.setattr(ray_executor.ray, "nodes", lambda: NODES)
    ray_executor.check_resources(ResourcesConfig(num_cpus=2), can_grow=False)  # fits
    with pytest.raises(ConfigError, match=r"resources.num_cpus 4, resources.num_gpus 0 per task, but the largest "
                                          r"node has 2 CPUs and 0 GPUs on this local Ray"):  # fmt: skip
        ray_executor.check_resources(ResourcesConfig(num_cpus=4), can_grow=False)
    with pytest.raises(ConfigError, match="0 GPUs"):  # a dead node's GPUs count for nothing
        ray_executor.check_resources(ResourcesConfig(num_gpus=1), can_grow=False)


def test_on_a_cluster_the_wait_for_a_node_is_said_and_bounded(monkeypatch, caplog) -> None:
    nodes = list(NODES)
    looks = []

    def cluster_nodes():
        looks.append(1)
        return nodes + ([{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}] if len(looks) > 3 else [])

    monkeypatch.setattr(ray_executor.ray, "nodes", cluster_nodes)
    ray_executor.check_resources(ResourcesConfig(num_cpus=4, num_gpus=1), can_grow=True, wait_seconds=5, poll_seconds=0.01)
    assert "waiting up to 5 s for a node that fits resources.num_cpus 4, resources.num_gpus 1 per task" in caplog.text
    assert "a node that fits the tasks has joined" in caplog.text

    monkeypatch.setattr(ray_executor.ray, "nodes", lambda: NODES)
    with pytest.raises(ConfigError, match=r"after 0 s the largest node of the cluster has 2 CPUs and 0 GPUs"):
        ray_executor.check_resources(ResourcesConfig(num_cpus=4), can_grow=True, wait_seconds=0.2, poll_seconds=0.05)


def test_the_status_reports_what_a_reduce_found(finished: Path) -> None:
    config, _, _, _ = run_module.open_run(str(finished))
    status = json.loads((Path(config.output) / "reduced" / "status.json").read_text())
    assert status["complete_epochs"] == [1, 2] and status["incomplete_epochs"] == {}
