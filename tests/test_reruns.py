"""A scheduled rerun costs its new work (issue 28): the reduce reads only the shards of checkpoints
that changed, draws only the figures whose rows changed, writes nothing unchanged, and gives the
same tables as a reduce of everything at once."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from invariance.analysis import plots
from invariance.config import parse_config
from invariance.engine import reduce as reduce_module
from invariance.engine.compact import compact
from invariance.engine.plan import make_plan
from invariance.engine.execute import execute_in_process
from invariance.engine.reduce import reduce_plan
from invariance.engine.steps import Workspace
from invariance.io.storage import Store
from tests.helpers import open_in_process, tiny_config, write_checkpoints, write_epoch, write_eval_parquet

KNN = {"train": {"format": "parquet", "path": "", "n_samples": 24}, "k": [3]}


def _config(tmp_path: Path, output: str = "out"):
    return parse_config(tiny_config(tmp_path, str(tmp_path / output), seeds=[0, 1], measures=["procrustes"],
                                    interpolation={"alphas": [0.5, 1.0], "epochs": "all"},
                                    knn={**KNN, "train": {**KNN["train"], "path": str(tmp_path / "bank")}}))  # fmt: skip


def _compute(config) -> tuple:
    store, plan, spec = open_in_process(config)
    execute_in_process(plan, spec, Workspace("cpu"))
    plan.refresh(store)
    return store, plan


class Counter:
    """Counts the shard reads (Store.get_many / Store.get of shard keys) and figures drawn."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shards: list[str] = []
        self.drawn: list[str] = []
        get_many, get = Store.get_many, Store.get

        def counted_read(store, keys):
            self.shards += [k for k in keys if not k.startswith("reduced/")]
            return get_many(store, keys)

        def counted_get(store, key):
            if key.endswith(".parquet") and not key.startswith("reduced/"):
                self.shards.append(key)
            return get(store, key)

        monkeypatch.setattr(Store, "get_many", counted_read)
        monkeypatch.setattr(Store, "get", counted_get)
        draw = reduce_module._draw

        def counted_draw(store, figures, stored, files, code, result, partitions=None, listed=None):
            drawn = draw(store, figures, stored, files, code, result, partitions, listed)
            self.drawn += list(drawn)
            return drawn

        monkeypatch.setattr(reduce_module, "_draw", counted_draw)

    def reset(self) -> None:
        self.shards, self.drawn = [], []


def test_a_rerun_reads_and_draws_only_what_is_new_and_equals_a_reduce_of_everything(
    tmp_path: Path, torch_single_thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    import shutil

    shutil.copytree(tmp_path / "data", tmp_path / "bank")
    config = _config(tmp_path)
    counter = Counter(monkeypatch)
    store, plan = _compute(config)
    reduce_plan(plan, store)
    assert counter.shards and store.exists("reduced/index.json")
    assert {"plots/flow/epoch=1.png", "plots/flow/epoch=2.png", "plots/cka/epoch=2.png", "plots/procrustes/epoch=1.png",
            "plots/layer_curves.png", "plots/interpolation/epoch=2.png"} <= set(counter.drawn)  # fmt: skip

    # nothing new: no shard read, no figure drawn, nothing written
    counter.reset()
    _, plan = _compute(config)
    again = reduce_plan(plan, store)
    assert counter.shards == [] and counter.drawn == [] and again.written == []
    assert again.complete_epochs == [1, 2] and not again.curves.is_empty()

    # one new epoch: only its shards read; its own figures drawn, and the summaries across epochs
    write_epoch(tmp_path / "ckpt", None, 3)
    counter.reset()
    _, plan = _compute(config)
    later = reduce_plan(plan, store)
    assert counter.shards and all("epoch=3" in key or "pretrained" in key for key in counter.shards), counter.shards
    per_epoch = [key for key in counter.drawn if "epoch=" in key]
    assert per_epoch and all("epoch=3" in key or "/flow/" in key for key in per_epoch), per_epoch
    assert "plots/layer_curves.png" in counter.drawn and "plots/dynamics.png" in counter.drawn
    assert later.complete_epochs == [1, 2, 3]
    assert set(later.curves.filter(pl.col("alpha") == 0.5)["epoch"]) == {1, 2, 3}

    # the same tables as one reduce of everything (a fresh output of the same shards)
    fresh = Store(str(tmp_path / "copy"))
    shutil.copytree(tmp_path / "out", tmp_path / "copy", ignore=shutil.ignore_patterns("reduced", "plots", "reports"))
    scratch_config = _config(tmp_path, "copy")
    _, scratch_plan = _compute(scratch_config)
    scratch = reduce_plan(scratch_plan, fresh)
    assert_frame_equal(later.curves, scratch.curves, check_exact=True)
    for key in ("reduced/flow.parquet", "reduced/knn.parquet", "reduced/cka.parquet", "reduced/procrustes.parquet",
                "reduced/inversions.parquet"):  # fmt: skip
        assert_frame_equal(pl.read_parquet(store.path(key)), pl.read_parquet(fresh.path(key)), check_exact=True), key


def test_a_flow_heatmap_is_drawn_again_when_its_runs_colour_range_changes(tmp_path: Path, monkeypatch) -> None:
    """Every epoch's heatmap of a run shares one colour range: a new epoch that widens it redraws them."""
    rows = pl.DataFrame({"run": [""] * 2, "checkpoint": ["a", "a"], "epoch": [1, 1], "alpha": [1.0, 1.0],
                         "pt_layer": [0, 0], "ft_layer": [0, 1], "flow": [0.0, 0.1]})  # fmt: skip
    wider = pl.concat([rows, rows.with_columns(pl.lit(2, dtype=pl.Int64).alias("epoch"), pl.Series("flow", [0.0, 0.7]))])
    assert plots.flow_color_limit(rows) != plots.flow_color_limit(wider)
    a_little_more = rows.with_columns(pl.Series("flow", [0.0, 0.15]))  # within the same step (0.2): no redraw
    assert plots.flow_color_limit(a_little_more) == plots.flow_color_limit(rows.with_columns(pl.Series("flow", [0.0, 0.12])))
    first = reduce_module._frame_hash(rows, repr(plots.flow_color_limit(rows)))
    assert first != reduce_module._frame_hash(rows, repr(plots.flow_color_limit(wider)))
    assert first == reduce_module._frame_hash(rows.clone(), repr(plots.flow_color_limit(rows)))


def test_a_plan_of_inputs_checked_before_builds_no_model_and_reads_no_image(tmp_path: Path, torch_single_thread,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from invariance.engine import plan as plan_module
    from invariance.engine.plan import make_plan

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0]))
    store, first = _compute(config)
    reduce_plan(first, store, make_plots=False)  # keeps the plan's verdict on these inputs
    built: list[str] = []
    for name in ("check_models", "input_fingerprints", "check_path_shapes"):
        real = getattr(plan_module, name)
        monkeypatch.setattr(plan_module, name, lambda *a, _name=name, _real=real, **k: built.append(_name) or _real(*a, **k))
    again = make_plan(config, store)
    assert built == [] and again.missing() == [] and again.hashes == first.hashes and again.layer_names == first.layer_names
    write_epoch(tmp_path / "ckpt", None, 2)  # a new checkpoint: the same inputs, no check again
    later = make_plan(config, store)
    assert built == [] and later.missing() and {getattr(u, "epoch", 2) for u in later.missing()} == {2}
    write_eval_parquet(tmp_path / "data", n=20)  # other eval images: checked again, new hashes
    other = make_plan(config, store)
    assert built[:1] == ["check_models"] and other.settings_hash != first.settings_hash


def test_a_schedule_submits_a_reduce_that_never_finished(tmp_path: Path, torch_single_thread) -> None:
    """Every shard done but the run stopped before its reduce: the next tick has work (the reduce),
    under an id of its own; after the reduce, nothing."""
    from jobs.run import next_submission

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0]))
    store, plan = _compute(config)  # computed, not reduced
    identifier, why = next_submission(config)
    assert identifier is not None and "-reduce-" in identifier and "not up to date" in why
    reduce_plan(plan, store, make_plots=False)
    # an output of raw shards (a run before compaction existed): the next tick compacts it
    identifier, why = next_submission(config)
    assert identifier is not None and "-compact-" in identifier and "to compact" in why
    compact(make_plan(config, store), store)
    assert next_submission(config) == (None, "nothing to compute: every shard of every checkpoint is done")
