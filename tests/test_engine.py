"""The engine without Ray: the plan's order and dependencies, the in-process executor, and the
STIR/CKA numbers of a fixed config pinned across refactors."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from invariance.config import parse_config, settings_hash
from invariance.engine.execute import SAME_ERROR_LIMIT, ExecuteSummary, execute_in_process
from invariance.engine.plan import make_plan
from invariance.engine.steps import Workspace
from invariance.errors import CheckpointError, ConfigError
from invariance.io.layout import InversionUnit, PointUnit, StirUnit
from invariance.io.storage import Store
from tests.helpers import GOLDEN_TOLERANCE, tiny_config, write_checkpoints, write_eval_parquet, open_in_process

GOLDEN = Path(__file__).resolve().parent / "data"


def open_tiny_run(tmp_path: Path, epochs: list[int], **overrides) -> tuple:
    write_checkpoints(tmp_path / "ckpt", epochs=epochs)
    write_eval_parquet(tmp_path / "data")
    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out"), **overrides))
    return (config, *open_in_process(config))


def test_work_comes_in_submission_order_with_its_dependencies(tmp_path: Path) -> None:
    _, _, plan, _ = open_tiny_run(tmp_path, [1, 2], seeds=[0])
    work = plan.work()
    kinds = [type(unit).__name__ for unit, _ in work]
    assert kinds[:3] == ["InversionUnit"] * 3  # layers 0..2, seed 0
    first_checkpoint = [unit for unit, _ in work[3:11]]
    assert [str(u) for u in first_checkpoint[:3]] == [f"stir epoch=01 ft[{j}] seed 0" for j in range(3)]
    assert [u.measure for u in first_checkpoint[3:5]] == ["cka", "subspace"] and isinstance(first_checkpoint[3], PointUnit)
    assert [str(u) for u in first_checkpoint[5:]] == [f"stir epoch=01 pt[{j}] seed 0" for j in range(3)]
    for unit, dependencies in work:
        expected = (InversionUnit(unit.ref_layer, unit.seed),) if isinstance(unit, StirUnit) and unit.ref_model == "pt" else ()
        assert dependencies == expected
    assert len(work) == 3 + 2 * (6 + 2)  # per checkpoint: 6 STIR, 1 CKA, 1 subspace shard


def test_the_in_process_executor_gives_the_pinned_numbers(tmp_path: Path, torch_single_thread) -> None:
    """The rows of a fixed config, computed before the library moved into subpackages (and by every
    release since): a refactor that changes a number fails here."""
    _, store, plan, spec = open_tiny_run(tmp_path, [1, 2])
    summary = execute_in_process(plan, spec, Workspace("cpu"))
    assert (summary.completed, summary.failures) == (len(plan.work()), [])
    plan.refresh(store)
    assert plan.work() == []
    stir = store.read_parquet([plan.data_key(u) for u in plan.of_type(StirUnit)])
    cka = store.read_parquet([plan.data_key(u) for u in plan.units["cka"]])
    for frame, name, keys, tolerance in (
        (stir, "golden_stir.csv", ["epoch", "ref_model", "ref_layer", "target_model", "target_layer", "seed"], GOLDEN_TOLERANCE["stir"]),
        (cka, "golden_cka.csv", ["epoch", "model_a", "layer_a", "model_b", "layer_b"], GOLDEN_TOLERANCE["cka"]),
    ):
        golden = pl.read_csv(GOLDEN / name)
        joined = golden.join(frame, on=keys, how="left", suffix="_now")
        assert len(joined) == len(frame) == len(golden)
        for value in [c for c in golden.columns if c not in keys]:
            difference = (joined[value] - joined[f"{value}_now"]).abs().max()
            assert difference < tolerance, f"{name}: {value} moved by {difference}"


def test_a_unit_whose_dependency_failed_is_not_attempted(tmp_path: Path, monkeypatch) -> None:
    from invariance.engine import execute as execute_module

    _, _, plan, spec = open_tiny_run(tmp_path, [1], seeds=[0], layers=[0])
    calls = []

    def fake_run_unit(spec, unit, workspace):
        calls.append(unit)
        if isinstance(unit, InversionUnit):
            raise RuntimeError("out of memory")
        return "ok"

    monkeypatch.setattr(execute_module, "run_unit", fake_run_unit)
    summary = execute_in_process(plan, spec, workspace=object())
    assert [str(u) for u in calls] == ["pt inversion layer 0 seed 0", "stir epoch=01 ft[0] seed 0", "cka epoch=01",
                                       "subspace epoch=01"]  # pt[0] not attempted  # fmt: skip
    assert summary.failures[-1] == ("stir epoch=01 pt[0] seed 0", "not attempted: a unit it depends on failed")
    assert summary.completed == 3 and not summary.stopped_early


def test_the_same_error_on_the_first_units_stops_the_run_once(tmp_path: Path, monkeypatch, caplog) -> None:
    from invariance.engine import execute as execute_module

    _, _, plan, spec = open_tiny_run(tmp_path, [1, 2, 3])
    calls = []

    def broken_model(spec, unit, workspace):
        calls.append(unit)
        raise TypeError("'NoneType' object is not callable")

    monkeypatch.setattr(execute_module, "run_unit", broken_model)
    summary = execute_in_process(plan, spec, workspace=object())
    assert len(calls) == SAME_ERROR_LIMIT and summary.stopped_early
    assert "the first 3 shards all failed with the same error" in summary.stop_reason
    assert caplog.text.count("stopping:") == 1


def test_one_bad_checkpoint_first_in_line_does_not_stop_the_others(tmp_path: Path, monkeypatch) -> None:
    """The same error on the first units stops the run only when it is not one checkpoint's own:
    a corrupt checkpoint queued first (its inversions cached by an earlier run) fails its units,
    and the checkpoints after it still run."""
    from invariance.engine import execute as execute_module

    _, _, plan, spec = open_tiny_run(tmp_path, [1, 2, 3])
    bad = plan.checkpoints[0].url
    calls = []

    def corrupt_first(spec, unit, workspace):
        calls.append(unit)
        if isinstance(unit, InversionUnit):
            raise AssertionError("the inversions were cached")
        if unit.checkpoint_url == bad:
            raise CheckpointError(f"checkpoint {bad}: not a readable safetensors file")
        return "ok"

    monkeypatch.setattr(execute_module, "run_unit", corrupt_first)
    monkeypatch.setattr(type(plan), "work", lambda self: [(u, ()) for u in [*self.of_type(StirUnit), *self.units["cka"]]])
    summary = execute_in_process(plan, spec, workspace=Workspace("cpu"))
    assert not summary.stopped_early
    assert summary.failures and all(bad in message for _, message in summary.failures)
    assert summary.completed == len(plan.of_type(StirUnit)) + len(plan.units["cka"]) - len(summary.failures) > 0
    # the same message from two checkpoints, from the pretrained model's units, or from the one
    # checkpoint there is (nothing else queued: a systematic error) still stops
    one_checkpoint = [u for u in plan.of_type(StirUnit) if u.checkpoint_url == bad]
    for units, queued in (([plan.of_type(StirUnit)[0], plan.of_type(StirUnit)[0], next(u for u in plan.of_type(StirUnit) if u.checkpoint_url != bad)], plan.of_type(StirUnit)),
                          ([InversionUnit(0, 0), InversionUnit(0, 1), InversionUnit(1, 0)], plan.of_type(StirUnit)),
                          (one_checkpoint[:3], one_checkpoint)):  # fmt: skip
        guarded = ExecuteSummary()
        guarded.expect([(u, ()) for u in queued])
        for unit in units:
            guarded.add_failure(unit, RuntimeError("shape mismatch"))
        assert guarded.stopped_early, units


def test_an_image_size_the_model_cannot_take_is_refused_before_any_task(tmp_path: Path) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    raw = tiny_config(tmp_path, str(tmp_path / "out"))
    raw["data"]["image_size"] = 32  # the tiny ViT is built for 16x16
    config = parse_config(raw)
    with pytest.raises(ConfigError, match=r"data\.image_size: vit_tiny_patch16_224 takes 16x16 images, not 32x32"):
        make_plan(config, Store(config.output))


def test_model_strict_changes_no_settings_hash(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, str(tmp_path / "out"))
    loose = {**raw, "model": {**raw["model"], "strict": False}}
    assert settings_hash(parse_config(raw).numbers_settings()) == settings_hash(parse_config(loose).numbers_settings())


def test_missing_per_point_is_counted_once_per_state_of_done(tmp_path: Path, monkeypatch) -> None:
    """The reduce asks ~8 times (incomplete checkpoints, points, epochs, path points): one pass over
    the units per state of ``done``, whether ``done`` is replaced (refresh) or changed in place
    (the reduce's _forget discards records); the counts as before."""
    _, _, plan, _ = open_tiny_run(tmp_path, [1, 2], seeds=[0])

    def uncached() -> dict:
        plan._missing_points = None
        return dict(plan.missing_per_point())

    everything = uncached()
    assert everything == {("", 1, 1.0): 7, ("", 2, 1.0): 7}  # 6 STIR + CKA per checkpoint (subspace does not gate)
    passes = []
    original = plan.missing
    monkeypatch.setattr(plan, "missing", lambda *a: passes.append(a) or original(*a))
    first = plan.missing_per_point()
    first[("", 1, 1.0)] = 99  # a caller's change to its copy is not kept
    assert plan.missing_per_point() == everything and plan.incomplete_checkpoints() == {("", 1): 7, ("", 2): 7}
    assert plan.incomplete_points() == set(everything) and plan.incomplete_epochs() == {1: 7, 2: 7}
    assert passes == []
    epoch_one = [plan.record_key(u) for u in plan.all_units() if getattr(u, "epoch", None) == 1]
    plan.done.update(epoch_one)  # in place
    assert plan.missing_per_point() == {("", 2, 1.0): 7} == uncached()
    plan.done.discard(epoch_one[0])
    assert plan.missing_per_point() == uncached() and ("", 1, 1.0) in plan.missing_per_point()
    plan.done = set()  # replaced
    assert plan.missing_per_point() == everything
