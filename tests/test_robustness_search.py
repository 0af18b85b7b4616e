"""The paper's robustness search on planted metrics: the planted hypothesis comes out on top, and
the Bonferroni factor is the number of hypotheses tested."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from invariance.analysis import robustness_search as rs

EPOCHS = list(range(1, 11))
LAYERS = list(range(5))


def planted(seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Curves where the max of learning over the last 3 layers is a linear function of the mean
    corrupted accuracy, everything else noise; and the run's metrics with per-severity rows."""
    rng = np.random.default_rng(seed)
    accuracy = rng.uniform(0.3, 0.9, len(EPOCHS))
    rows = []
    for e, epoch in enumerate(EPOCHS):
        learning = {layer: rng.uniform(0.0, 1.5) if layer < 2 else rng.uniform(0.0, 0.5) for layer in LAYERS}
        learning[int(rng.integers(2, 5))] = 0.6 + 0.5 * accuracy[e]  # the max of layers 2..4, in a varying layer
        for layer in LAYERS:
            rows.append({"checkpoint": f"epoch={epoch:02d}", "epoch": epoch, "layer": layer,
                         "forgetting_mean": rng.uniform(0, 1), "learning_mean": learning[layer],
                         "cka_divergence_mean": rng.uniform(0, 1)})  # fmt: skip
    metrics = pl.DataFrame(
        {
            "epoch": EPOCHS,
            "corrupted_accuracy": accuracy,
            "corrupted": [
                [{"corruption": "noise", "severity": s, "loss": 1.0, "accuracy": a - 0.05 * s} for s in (1, 3)]
                for a in accuracy
            ],
        }
    )
    return pl.DataFrame(rows), metrics


def test_layer_sets_are_singles_first_n_and_last_n_once_each() -> None:
    names = [s.name for s in rs.layer_sets(LAYERS)]
    assert names == ["layer 0", "layer 1", "layer 2", "layer 3", "layer 4", "first 2", "last 2", "first 3", "last 3",
                     "first 4", "last 4", "first 5"]  # fmt: skip  ("last 5" is "first 5")


def test_the_planted_hypothesis_is_found_and_bonferroni_counts_what_was_tested() -> None:
    curves, metrics = planted()
    table = rs.search(curves, metrics, run="runs/a")
    mean = table.filter(pl.col("target") == "mean")
    top = mean.row(0, named=True)
    assert (top["family"], top["combination"], top["layer_set"], top["aggregation"]) == ("stir", "learning", "last 3", "max")
    assert top["pearson_r"] == pytest.approx(1.0) and top["layers"] == [2, 3, 4]
    # 12 layer sets: 5 singles tested once, 7 sets x 4 aggregations; 4 STIR combinations + CKA divergence
    expected = 4 * (5 + 7 * 4) + 1 * (5 + 7 * 4)
    assert mean["pearson_r"].is_not_null().sum() == expected
    assert set(mean["n_hypotheses"]) == {expected}
    assert mean["p_bonferroni"].to_list() == pytest.approx([min(1.0, p * expected) for p in mean["p_value"]])
    assert set(table["target"]) == {"mean", "severity 1", "severity 3"}
    assert rs.strongest(table, n=1)["layer_set"].to_list() == ["last 3"]


def test_the_early_epoch_curve_grows_from_three_epochs() -> None:
    curves, metrics = planted()
    table = rs.search(curves, metrics, run="r")
    early = rs.early_epochs(curves, metrics, "r", rs.strongest(table, n=2))
    planted_rows = early.filter(pl.col("layer_set") == "last 3")
    assert planted_rows["n_epochs"].to_list() == list(range(3, len(EPOCHS) + 1))
    assert planted_rows["up_to_epoch"].to_list() == EPOCHS[2:]
    assert planted_rows["pearson_r"].to_list() == pytest.approx([1.0] * (len(EPOCHS) - 2))


def test_too_few_epochs_give_no_r_and_count_no_hypothesis() -> None:
    curves, metrics = planted()
    short = rs.search(curves.filter(pl.col("epoch") <= 2), metrics, run="r")
    assert short["pearson_r"].null_count() == len(short) and set(short["n_hypotheses"]) == {0}


def test_a_run_without_accuracies_gives_an_empty_table_of_the_right_types() -> None:
    curves, metrics = planted()
    no_scores = metrics.with_columns(pl.lit(None, dtype=pl.Float64).alias("corrupted_accuracy"), pl.lit([]).alias("corrupted"))
    table = rs.search(curves, no_scores, run="r")
    assert table.is_empty() and table.schema == rs.SEARCH_SCHEMA
    assert rs.strongest(table).is_empty()
    assert rs.early_epochs(curves, no_scores, "r", rs.strongest(table)).is_empty()


def test_subspace_similarity_is_searched_as_its_own_family_when_present() -> None:
    curves, metrics = planted()
    with_subspace = curves.with_columns((1.0 - pl.col("cka_divergence_mean") / 2).alias("subspace_similarity"))
    table = rs.search(with_subspace, metrics, run="r").filter(pl.col("target") == "mean")
    subspace = table.filter(pl.col("family") == "subspace")
    assert set(subspace["combination"]) == {"subspace_similarity"} and subspace.height == 5 + 7 * 4
    assert set(table["n_hypotheses"]) == {4 * (5 + 7 * 4) + 2 * (5 + 7 * 4)}
