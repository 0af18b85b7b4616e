"""What a scheduled rerun with one new checkpoint costs on object storage (issue 28): counted on the
S3 test server (a counting proxy in front of it), the requests do not grow with the history. Reads
and heads of old epochs: none; listings: one page per 1,000 keys (the same count here)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from invariance.config import parse_config
from invariance.engine.compact import compact
from invariance.engine.execute import execute_in_process
from invariance.engine.plan import make_plan
from invariance.engine.reduce import reduce_plan
from invariance.engine.steps import RunSpec, Workspace
from invariance.io.storage import Store
from tests.helpers import tiny_config, write_checkpoints, write_epoch, write_eval_parquet
from tests.s3_counting import CountingProxy
from tests.servers import s3_server  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def _tick(config, direct: Store) -> None:
    """One scheduled tick in process, as ``invariance run`` does it: plan, compute what is new, list
    again the folders of what it computed, compact, reduce. That refresh finds what a full one would
    (checked through ``direct``, the server without the counting proxy)."""
    store = Store(config.output, config.storage_options)
    plan = make_plan(config, store)
    if plan.missing_keys:
        submitted = plan.missing()
        execute_in_process(plan, RunSpec.from_plan(config, store, plan), Workspace("cpu"))
        plan.refresh(store, submitted)
        full = copy.copy(plan)
        full.refresh(direct)
        assert (plan.done, plan.present, plan.records, plan.holder) == (full.done, full.present, full.records, full.holder)
    compact(plan, store)
    reduce_plan(plan, store, settings=config.numbers_settings())


def _requests_of_one_new_checkpoint(tmp_path: Path, proxy: CountingProxy, server, history: int, bucket: str) -> dict[str, int]:
    write_checkpoints(tmp_path / "ckpt", epochs=list(range(1, history + 1)))
    write_eval_parquet(tmp_path / "data")
    raw = tiny_config(tmp_path, f"s3://{bucket}/out", seeds=[0], storage_options=proxy.server().fsspec_options())
    config = parse_config(raw)
    direct = Store(f"s3://{bucket}/out", server.fsspec_options())
    _tick(config, direct)  # the history
    _tick(config, direct)  # settled: nothing new
    write_epoch(tmp_path / "ckpt", None, history + 1)
    proxy.reset()
    _tick(config, direct)
    counts = dict(proxy.counts)
    # a flow heatmap of an old epoch is redrawn only when its run's colour range crosses a 1-2-5 step
    counts["PUT old flow heatmaps"] = sum(1 for kind, key in proxy.keys if kind == "PUT" and "/plots/flow/" in key
                                          and f"epoch={history + 1}.png" not in key)  # fmt: skip
    return counts


def test_the_requests_of_a_rerun_with_one_new_checkpoint_do_not_grow_with_the_history(tmp_path: Path, s3_server) -> None:
    proxy = CountingProxy(s3_server)
    try:
        s3_server.make_bucket("short")
        s3_server.make_bucket("long")
        short = _requests_of_one_new_checkpoint(tmp_path / "short", proxy, s3_server, 1, "short")
        long = _requests_of_one_new_checkpoint(tmp_path / "long", proxy, s3_server, 5, "long")
    finally:
        proxy.close()
    print(f"\nrequests of a rerun with one new checkpoint: after 1 epoch {short}; after 5 epochs {long}")
    for kind in ("GET", "HEAD", "LIST"):  # (a first epoch's rerun heads a few files a later one does not)
        assert long.get(kind, 0) <= short.get(kind, 0), (kind, short, long)
    redrawn = long["PUT old flow heatmaps"] - short["PUT old flow heatmaps"]
    assert long.get("PUT", 0) - redrawn <= short.get("PUT", 0), (short, long)
