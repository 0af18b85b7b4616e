"""Nothing read twice: a worker's pretrained X' cache (bounded in bytes) and shard contexts that
keep only the Grams of the features on X."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from invariance.io.layout import InversionUnit, StirUnit
from invariance.config import parse_config
from invariance.core.inversion import InversionResult
from invariance.engine.execute import execute_in_process
from invariance.engine.plan import make_plan
from invariance.engine.steps import InversionCache, RunSpec, Workspace
from invariance.io.storage import Store
from tests.helpers import load_bench_module, tiny_config, write_checkpoints, write_eval_parquet

pytestmark = pytest.mark.usefixtures("torch_single_thread")

reads = load_bench_module("bench_reads")


def _result(n: int, value: float = 0.0) -> InversionResult:
    return InversionResult(torch.full((n, 3, 4, 4), value), torch.zeros(n), 1)


def test_the_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    size = InversionCache.size(_result(2))  # 2 x 48 floats + 2 losses
    assert size == (2 * 48 + 2) * 4
    cache = InversionCache(max_bytes=2 * size)
    loads: list[str] = []

    def loader(key: str):
        return lambda: loads.append(key) or _result(2, float(len(loads)))

    a = cache.get("a", loader("a"))
    cache.get("b", loader("b"))
    assert cache.get("a", loader("a")) is a  # a hit: not loaded again, now the most recent
    cache.get("c", loader("c"))  # evicts b, the least recently used
    assert loads == ["a", "b", "c"] and len(cache) == 2 and cache.bytes == 2 * size
    cache.get("a", loader("a"))
    cache.get("b", loader("b"))
    assert loads == ["a", "b", "c", "b"]
    assert cache.bytes <= cache.max_bytes
    # an X' larger than the whole bound is handed over, never kept
    big = cache.get("big", lambda: _result(5))
    assert big.images.shape[0] == 5 and "big" not in cache._entries and cache.bytes <= cache.max_bytes


def _run(tmp_path: Path, epochs: list[int], cache_bytes: int | None) -> tuple[dict, pl.DataFrame, int]:
    config = parse_config(tiny_config(tmp_path, str(tmp_path / f"out-{cache_bytes}")))
    store = Store(config.output)
    plan = make_plan(config, store)
    spec = RunSpec.from_plan(config, store, plan)
    workspace = Workspace("cpu") if cache_bytes is None else Workspace("cpu", inversion_cache_bytes=cache_bytes)
    with reads.counting_reads() as counts:
        summary = execute_in_process(plan, spec, workspace)
    assert summary.failures == []
    stir = store.read_parquet([plan.data_key(u) for u in plan.of_type(StirUnit)]).drop("version").sort(pl.all())
    return dict(counts), stir, len(plan.of_type(InversionUnit))


def test_a_worker_reads_each_pretrained_inversion_once_whatever_the_checkpoints(tmp_path: Path):
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2, 3])
    write_eval_parquet(tmp_path / "data")
    cached, stir_cached, inversions = _run(tmp_path, [1, 2, 3], None)
    uncached, stir_uncached, _ = _run(tmp_path, [1, 2, 3], 0)
    one_xprime = 12 * 3 * 16 * 16 * 4  # 12 samples of [3, 16, 16] float32, plus losses and a header
    assert inversions * one_xprime < cached[reads.XPRIME] < inversions * (one_xprime + 1024)
    # without the cache the same X' is read again for each of the 3 checkpoints
    assert uncached[reads.XPRIME] == 3 * cached[reads.XPRIME]
    # the same numbers either way
    assert stir_cached.drop("settings").equals(stir_uncached.drop("settings"))


def test_a_shard_context_keeps_only_the_grams(tmp_path: Path):
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out")))
    store = Store(config.output)
    plan = make_plan(config, store)
    spec = RunSpec.from_plan(config, store, plan)
    context = Workspace("cpu").context(spec, plan.checkpoints[0].url)
    rows = context.cka_rows()
    n, n_layers = 12, len(plan.layers)
    # pt and ft, biased and debiased: [layers, n, n] float64 each, and nothing else
    assert context.held_bytes() == 2 * 2 * n_layers * n * n * 8
    # every tensor the context holds beyond its models and images is one of those Grams
    held = [t for key, value in vars(context).items() if key not in ("models", "eval_images")
            for t in (value.values() if isinstance(value, dict) else [value])
            if isinstance(t, torch.Tensor) or isinstance(t, dict)]  # fmt: skip
    assert all(isinstance(t, torch.Tensor) and t.shape == (n_layers, n, n) for t in held) and len(held) == 4
    assert len(rows) == (2 * n_layers) ** 2
