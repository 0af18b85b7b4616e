"""bench_optimizers.py: loss per step of each optimizer on the same model, images and noise."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_bench_module

pytestmark = pytest.mark.usefixtures("torch_single_thread")

bench = load_bench_module("bench_optimizers")


def test_the_optimizer_benchmark_compares_losses_steps_and_stir():
    settings = bench.OptimizerBenchSettings(samples=4, layers=(1,), steps=(25, 500), adam_step_sizes=(0.05,), long=30, depth=2)
    result = bench.run_benchmark(settings)
    (layer,) = result.layers
    reference, adam = layer.curves
    assert (reference.name, adam.name) == ("reference 0.5", "adam 0.05")
    assert set(reference.loss) == set(adam.loss) == {25, 500}
    # best iterate kept: more steps never give a higher loss
    assert reference.loss[500] <= reference.loss[25] and adam.loss[500] <= adam.loss[25]
    # Adam reaches the reference's 500-step loss no later than the reference does
    target = result.reference_loss(layer)
    assert adam.steps_to_reach(target) <= reference.steps_to_reach(target) == result.worst_steps_to_reach("reference 0.5")
    # the reference at its budget against both long runs (Adam's budgets, 125 and 100, are not in this grid)
    assert set(layer.stir_diff) == {"reference 0.5 @500 vs reference@30", "reference 0.5 @500 vs adam@30"}
    assert all(0 <= v < 1 for v in layer.stir_diff.values())
    assert result.max_stir_diff("reference 0.5", "adam") == layer.stir_diff["reference 0.5 @500 vs adam@30"]
    # steps to the reference's loss at every budget, and Adam at a quarter of each budget that has one
    assert set(result.steps_to_reference(layer, "adam 0.05")) == {25, 500}
    assert result.steps_to_reference(layer, "reference 0.5")[25] == 25
    assert settings.quarter_budgets() == []  # 125 is not in this grid
    json.dumps(result.summary())
    report = bench.format_report(result)
    assert "steps to ref@500" in report and "| adam 0.05" in report and "ref@25" in report


def test_adam_at_a_quarter_of_the_reference_steps_is_lower_on_the_cnn_fixture():
    settings = bench.OptimizerBenchSettings(samples=4, layers=(0, 5), steps=(25, 100, 500), adam_step_sizes=(0.1,),
                                            long=10, fixture="cnn")  # fmt: skip
    assert settings.quarter_budgets() == [100]
    result = bench.run_benchmark(settings)
    assert [layer.layer for layer in result.layers] == [0, 5]
    rows = result.quarter_budget("adam 0.1")
    assert [(row["layer"], row["budget"]) for row in rows] == [(0, 100), (5, 100)]
    assert all(row["lower"] for row in rows), rows
    assert "adam 0.1 at a quarter of the reference's steps" in bench.format_report(result)


def test_the_grid_must_hold_the_reference_budget():
    with pytest.raises(ValueError, match="500"):
        bench.OptimizerBenchSettings(steps=(25, 100))
    with pytest.raises(ValueError, match="fixture"):
        bench.OptimizerBenchSettings(fixture="mlp")
