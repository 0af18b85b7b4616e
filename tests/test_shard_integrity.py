"""Shards whose data is lost, unreadable or non-finite are never counted as done (issue 13.7,
13.9): in process, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from invariance.config import parse_config
from invariance.engine.execute import execute_in_process
from invariance.engine.reduce import reduce_plan
from invariance.engine.steps import Workspace
from invariance.io.layout import MANIFESTS, InversionUnit, StirUnit
from invariance.io.synthetic import ShapesDataset, make_shapes, to_parquet_bytes
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet, open_in_process


def _open(tmp_path: Path, **overrides) -> tuple:
    return open_in_process(parse_config(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0], layers=[0, 2], **overrides)))


@pytest.fixture
def finished(tmp_path: Path, torch_single_thread) -> tuple:
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    store, plan, spec = _open(tmp_path)
    summary = execute_in_process(plan, spec, Workspace("cpu"))
    assert summary.failures == [] and summary.completed == len(plan.work())
    return tmp_path, store, spec


def test_a_record_whose_shard_file_was_deleted_is_recomputed(finished) -> None:
    tmp_path, store, spec = finished
    _, plan, _ = _open(tmp_path)
    assert plan.work() == []
    lost = next(u for u in plan.of_type(StirUnit) if (u.epoch, u.ref_model, u.ref_layer, u.seed) == (2, "ft", 2, 0))
    (tmp_path / "out" / plan.data_key(lost)).unlink()
    _, plan, spec = _open(tmp_path)
    assert [str(unit) for unit, _ in plan.work()] == ["stir epoch=02 ft[2] seed 0"]
    assert plan.incomplete_epochs() == {2: 1}
    assert reduce_plan(plan, store, make_plots=False).complete_epochs == [1]  # never reduced over a gap
    assert execute_in_process(plan, spec, Workspace("cpu")).completed == 1
    plan.refresh(store)
    assert plan.work() == [] and reduce_plan(plan, store, make_plots=False).complete_epochs == [1, 2]


def test_an_unreadable_shard_is_missing_again_and_recomputed(finished) -> None:
    tmp_path, store, spec = finished
    _, plan, _ = _open(tmp_path)
    cka = (tmp_path / "out" / plan.data_key(next(u for u in plan.units["cka"] if u.epoch == 1)))
    cka.write_bytes(cka.read_bytes()[:50])  # truncated
    result = reduce_plan(plan, store, make_plots=False)
    assert [str(u) for u in result.unreadable] == ["cka epoch=01"]
    assert result.complete_epochs == [2] and result.incomplete_epochs == {1: 1}
    status = json.loads((tmp_path / "out" / "reduced" / "status.json").read_text())
    assert status["incomplete_epochs"] == {"1": 1}
    _, plan, spec = _open(tmp_path)  # the next run: the record is gone, the shard is missing
    assert [str(unit) for unit, _ in plan.work()] == ["cka epoch=01"]
    assert execute_in_process(plan, spec, Workspace("cpu")).completed == 1
    plan.refresh(store)
    assert reduce_plan(plan, store, make_plots=False).complete_epochs == [1, 2]


def test_non_finite_rows_are_never_written_nor_marked_done(tmp_path: Path, torch_single_thread, caplog) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    one = make_shapes(1, size=16, seed=5)  # twelve copies of one image: every feature is constant, CKA is NaN
    alike = ShapesDataset(one.images.repeat(12, 1, 1, 1), one.shape.repeat(12), one.texture.repeat(12))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test-00000-of-00001.parquet").write_bytes(to_parquet_bytes(alike, "texture"))
    store, plan, spec = _open(tmp_path)
    summary = execute_in_process(plan, spec, Workspace("cpu"))
    # the two pt inversions (finite losses), and the subspace shard: finite features of no variance, its
    # similarity undefined (null), as it is for fewer than k + 1 images
    assert summary.completed == 3
    assert summary.failures and all("non-finite values (NaN or inf) in stir" in m or "in cka" in m
                                    for _, m in summary.failures)  # fmt: skip
    assert "FAILED stir epoch=01 ft[0] seed 0: non-finite values (NaN or inf) in stir (" in caplog.text
    assert not (tmp_path / "out" / "stir").exists() and not (tmp_path / "out" / "cka").exists()
    subspace = pl.read_parquet(next((tmp_path / "out" / "subspace").rglob("*.parquet")))["subspace_similarity"]
    assert subspace.len() == len(plan.layers) and subspace.null_count() == subspace.len()
    plan.refresh(store)
    assert len(plan.missing_of_type(StirUnit)) == len(plan.of_type(StirUnit))
    # no record of STIR or CKA (the subspace shard's record is under its own hash)
    assert not list((tmp_path / "out" / MANIFESTS).glob(f"settings={plan.settings_hash}"))
