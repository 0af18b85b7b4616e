"""End to end on a local Ray (2 CPUs): tiny ViT, 3 checkpoints, output in a temp folder."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from invariance.config import parse_config
from invariance.io.data import load_eval_images
from invariance.core.models import load_model
from invariance.core.shards import ShardContext
from jobs.run import run
from tests.helpers import tiny_config, write_checkpoints, write_epoch, write_eval_parquet
from tests.ray_fixtures import local_ray  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, local_ray: None):
    tmp = tmp_path_factory.mktemp("job")
    write_checkpoints(tmp / "ckpt", epochs=[1, 2, 3])
    write_eval_parquet(tmp / "data")
    raw = tiny_config(tmp, str(tmp / "out"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # what `invariance run --no-progress` shows in a log
        first = run(parse_config(raw), progress=False, started=time.time() - 100)
    print(printed.getvalue())
    return tmp, raw, first, printed.getvalue()


def test_first_run_computes_every_unit(finished_run) -> None:
    _, _, first, _ = finished_run
    # 3 layers x 2 seeds pt inversions, 3 ckpts x 2 refs x 3 layers x 2 seeds STIR, 3 CKA, 3 subspace
    assert first.execution.failures == []
    assert first.execution.completed == 6 + 36 + 3 + 3
    assert first.reduced.complete_epochs == [1, 2, 3]


def test_without_a_bar_the_log_says_when_each_checkpoint_is_complete_and_when_the_first_task_started(finished_run) -> None:
    """`--no-progress` (a log): a line as each checkpoint's units are all done, the time from the
    command's start to its first task, and the whole run's time."""
    _, _, first, printed = finished_run
    lines = printed.splitlines()
    complete = [line.split(" (")[0] for line in lines if " complete (" in line]
    assert sorted(complete) == ["checkpoint epoch=01 complete", "checkpoint epoch=02 complete",
                                "checkpoint epoch=03 complete", "pretrained model complete"]  # fmt: skip
    assert f"({first.execution.completed}/{first.execution.completed} units, " in [line for line in lines if " complete (" in line][-1]
    (started,) = [line for line in lines if line.startswith("first task submitted ")]
    assert started.endswith("after the start") and first.execution.first_task_seconds >= 100  # started 100 s before
    assert f"(the first task submitted {first.execution.first_task_seconds:.1f} s after the start)" in printed
    assert "done in 1" in printed and "shard/s" not in printed and "%|" not in printed  # no bar


def test_outputs_follow_the_layout(finished_run) -> None:
    tmp, _, _, _ = finished_run
    out = tmp / "out"
    stir = pl.scan_parquet(str(out / "stir" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert stir.height == 36 * 2 * 3  # each shard: 2 target models x 3 layers
    assert set(stir["epoch"].unique()) == {1, 2, 3}
    assert stir.filter(pl.col("stir").is_null()).is_empty()
    curves = pl.read_parquet(out / "reduced" / "curves.parquet")
    assert {"checkpoint", "epoch", "layer", "forgetting_mean", "forgetting_std", "learning_mean",
            "learning_std", "cka_divergence_mean", "cka_divergence_std"} <= set(curves.columns)  # fmt: skip
    assert curves.height == 3 * 3
    flow = pl.read_parquet(out / "reduced" / "flow.parquet")
    assert {"checkpoint", "epoch", "pt_layer", "ft_layer", "flow"} <= set(flow.columns)
    assert flow.height == 3 * 3 * 3
    # every reduced row names the settings it comes from: the hash of the shards' folder
    (settings,) = stir["settings"].unique().to_list()
    assert curves["settings"].unique().to_list() == flow["settings"].unique().to_list() == [settings]
    plots = {p.relative_to(out / "plots").as_posix() for p in (out / "plots").rglob("*.png")}
    assert plots == {"layer_curves.png", "dynamics.png", "flow/epoch=1.png", "flow/epoch=2.png", "flow/epoch=3.png",
                     "cka/epoch=1.png", "cka/epoch=2.png", "cka/epoch=3.png"}  # cka/: the pt x ft layer heatmaps
    assert not list(out.rglob(".*.tmp"))


def test_values_equal_the_library_called_directly(finished_run) -> None:
    tmp, raw, _, _ = finished_run
    config = parse_config(raw)
    pt = load_model(config.model, config.pretrained)
    ft = load_model(config.model, str(tmp / "ckpt" / "ft" / "epoch=02.safetensors"))
    images = load_eval_images(config.data, pt.input_size)
    context = ShardContext({"pt": pt, "ft": ft}, images, [0, 1, 2], config.token_policy, config.inversion)
    stir = pl.read_parquet(str(tmp / "out" / "stir" / "**" / "*.parquet"), hive_partitioning=True)
    for ref_model, ref_layer, seed in [("pt", 1, 0), ("ft", 2, 1), ("ft", 0, 0)]:
        direct = pl.DataFrame(context.stir_rows(ref_model, ref_layer, seed)).sort("target_model", "target_layer")
        stored = stir.filter(
            (pl.col("epoch") == 2) & (pl.col("ref_model") == ref_model)
            & (pl.col("ref_layer") == ref_layer) & (pl.col("seed") == seed)
        ).sort("target_model", "target_layer")  # fmt: skip
        assert stored.height == direct.height == 6
        for column in ("stir", "stir_debiased", "inv_loss_mean"):
            torch.testing.assert_close(stored[column].to_torch(), direct[column].to_torch(), atol=2e-5, rtol=1e-4)


def test_rerun_computes_nothing_and_new_checkpoint_only_its_shards(finished_run) -> None:
    tmp, raw, _, _ = finished_run
    out = tmp / "out"
    before = {p: p.stat().st_mtime_ns for p in (out / "stir").rglob("*.parquet")}
    every_file = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "leases" not in p.parts}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        again = run(parse_config(raw), progress=False)
    assert again.execution.submitted == 0
    assert "(no task submitted: nothing to compute)" in printed.getvalue() and again.execution.first_task_seconds is None
    assert {p: p.stat().st_mtime_ns for p in (out / "stir").rglob("*.parquet")} == before
    # idempotent: a finished config's rerun changes nothing, reduced tables and plots included
    assert again.reduced.written == [] and again.reduced.complete_epochs == [1, 2, 3]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "leases" not in p.parts} == every_file

    write_epoch(tmp / "ckpt", None, 4)
    fourth = run(parse_config(raw), progress=False)
    # only epoch 4's 12 STIR shards, 1 CKA and 1 subspace shard; the pt inversions come from the cache
    assert fourth.execution.submitted == 12 + 1 + 1
    assert fourth.execution.failures == []
    assert fourth.reduced.complete_epochs == [1, 2, 3, 4]
    assert {p: p.stat().st_mtime_ns for p in (out / "stir").rglob("*.parquet") if p in before} == before
    assert len(list((out / "_cache" / "inversions").rglob("*.safetensors"))) == 6


def test_a_lost_lease_stops_submissions(finished_run) -> None:
    """Once the lease is lost, execute submits nothing more and waits for what is in flight."""
    from jobs.execute import execute
    from jobs.run import open_run

    tmp, raw, _, _ = finished_run
    fresh = {**raw, "output": str(tmp / "out-lost")}
    _, _, plan, spec = open_run(parse_config(fresh))
    polls = []

    def lost_after_two_polls() -> bool:
        polls.append(1)
        return len(polls) > 2

    summary = execute(plan, spec, progress=False, lease_lost=lost_after_two_polls)
    assert summary.stopped_early and summary.failures == []
    assert 0 < summary.submitted < len(plan.missing_keys)  # the first fill, then nothing more
    assert summary.completed == summary.submitted


def test_a_local_ray_listens_on_loopback_only():
    """Without RAY_ADDRESS (the demo, a laptop run) the local Ray keeps to 127.0.0.1: its node
    address and every socket its processes listen on (jobs sets Ray's switch before Ray is
    imported; without it Ray swaps in the machine's outward address and listens everywhere)."""
    probe = (
        "import os, jobs.run, ray\n"
        "from tests.servers import listening_addresses\n"
        "jobs.run.connect_ray(1)\n"
        "print('node', ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()))\n"
        "print('listening', sorted(listening_addresses(os.getpid())))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "node 127.0.0.1" in result.stdout
    listening = result.stdout.split("listening ", 1)[1].strip()
    assert listening == "['127.0.0.1']", listening  # gcs, raylet, agents, workers: loopback only
