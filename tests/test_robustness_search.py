"""The paper's robustness search on planted metrics: the planted hypothesis comes out on top, and
the Bonferroni factor is the number of hypotheses tested."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from invariance.analysis import robustness_search as rs

EPOCHS = list(range(1, 11))
LAYERS = list(range(5))


def planted(seed: int = 0, epochs: list[int] = EPOCHS) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Curves where the max of learning over the last 3 layers is a linear function of the mean
    corrupted accuracy, everything else noise; and the run's metrics with per-severity rows."""
    EPOCHS = epochs  # noqa: N806  (the module's default, or the epochs asked)
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


def test_min_epochs_is_where_a_strong_r_reaches_bonferroni_significance() -> None:
    """The rule: n_min(m) is the fewest epochs at which r = 0.9 has Bonferroni p < 0.05 among m."""
    from scipy import stats

    from invariance.analysis import robustness

    for m, expected in ((1, 5), (10, 8), (100, 10), (165, 11), (630, 12)):
        n = rs.min_epochs(m)
        assert n == expected
        assert rs.p_of_r(0.9, n) * m < 0.05 <= rs.p_of_r(0.9, n - 1) * m
    assert rs.min_epochs(0) == rs.min_epochs(1) == robustness.MIN_TRUSTED_EPOCHS
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=7), rng.normal(size=7)
    result = stats.pearsonr(x, y)
    assert rs.p_of_r(float(result.statistic), 7) == pytest.approx(result.pvalue, rel=1e-9)


def test_hypotheses_from_too_few_epochs_are_listed_apart_and_never_first() -> None:
    """Issue 27: r = 1.000 from 3 epochs was printed as the strongest hypothesis."""
    long_epochs = list(range(1, 13))  # 12 epochs: n_min(165) = 11
    curves, metrics = planted(epochs=long_epochs)
    long = rs.search(curves, metrics, run="z-long")
    short = rs.search(curves.filter(pl.col("epoch") <= 4), metrics, run="a-short")
    assert set(long["min_epochs"]) == {11} and long["enough_epochs"].all()
    assert not short["enough_epochs"].any()
    best_short = short.filter(pl.col("target") == "mean").row(0, named=True)
    assert best_short["pearson_r"] == pytest.approx(1.0)  # the planted link, perfect over 4 epochs too
    both = pl.concat([short, long])
    top = rs.strongest(both, n=3)
    assert top["run"].to_list() == ["z-long"] * 3 + ["a-short"] * 3  # "a-short" sorts first by name, yet comes last
    assert top["enough_epochs"].to_list() == [True] * 3 + [False] * 3
    supported = rs.strongest(both, n=3, supported_only=True)
    assert len(supported) >= 1 and set(supported["run"]) == {"z-long"} and (supported["p_bonferroni"] < 0.05).all()
    # in the search table itself: every hypothesis with enough epochs before any without
    mixed = rs.search(curves, metrics.filter(pl.col("epoch") != 12), run="r").filter(pl.col("target") == "mean")
    assert mixed["enough_epochs"].to_list() == sorted(mixed["enough_epochs"].to_list(), reverse=True)


def test_summary_states_counts_the_supported_hypotheses_the_rule_and_the_table() -> None:
    curves, metrics = planted(epochs=list(range(1, 13)))
    text = rs.summary(rs.search(curves, metrics, run=""))
    lines = text.splitlines()
    assert len(lines) <= 8
    assert lines[0].startswith("robustness search: 165 hypotheses tested against the mean corrupted accuracy")
    assert "165 of them from enough epochs" in lines[0]
    assert "strongest supported:" in text and "max of learning over last 3 (layers 2, 3, 4): r = 1.000 (n = 12 epochs)" in text
    assert "n_min(165) = 11" in text and lines[-1] == "table: reduced/robustness_search.parquet"

    short = rs.summary(rs.search(curves.filter(pl.col("epoch") <= 4), metrics, run="r"))
    assert "0 of them from enough epochs" in short and "No hypothesis is supported" in short
    assert "r = 1.000" not in short and "strongest" not in short
    assert "No hypothesis is supported: none reaches" in rs.summary(
        rs.search(*planted_noise(list(range(1, 13))), run="r"))
    assert "no hypothesis could be tested" in rs.summary(pl.DataFrame(schema=rs.SEARCH_SCHEMA))


def planted_noise(epochs: list[int]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Curves that are noise only: nothing tracks the accuracy."""
    curves, metrics = planted(epochs=epochs)
    rng = np.random.default_rng(3)
    return curves.with_columns(pl.Series("learning_mean", rng.uniform(0, 1, curves.height))), metrics
