"""The finetuning paper's robustness search (its Appendix E.1, Fig. 14): which summary of the
per-layer metrics tracks the accuracy on corrupted test sets over the epochs of a run?

A hypothesis is (layer set, combination, aggregation):
- layer sets: each single layer, the first n layers and the last n layers (n = 2..L, the full
  set once);
- combinations of the STIR metrics: ``forgetting``, ``learning``, their ``sum`` and their
  ``difference`` (forgetting - learning); for CKA, ``cka_divergence`` alone; and the paper's
  other baseline, ``subspace_similarity`` (family ``subspace``);
- aggregations over the layers of the set: ``mean``, ``std`` (population), ``min``, ``max``; a
  single layer has one value, so it is tested once (``value``), not four times.
Each is correlated over epochs (Pearson r and its two-sided p from ``scipy.stats.pearsonr``)
with the mean corrupted accuracy and with the accuracy at each severity, per run. The p values
are Bonferroni-corrected over the hypotheses actually tested for that run and target (those with
a defined r), and that count is reported. The early-epoch view (Fig. 14): r over epochs
0..n only, as n grows, for the strongest hypotheses.

What the data can carry (issue 27): a hypothesis counts only when its run has enough epochs for
the test. The rule: among m hypotheses tested, a Pearson r over n epochs is read only when
n >= ``min_epochs(m)``, the smallest n at which a strong link, r = DETECTABLE_R (0.9; the paper
reports 0.78 and 0.877), would reach Bonferroni p < 0.05 (Student t with n - 2 degrees of
freedom, as ``scipy.stats.pearsonr``). Below it the test cannot tell a strong link from none: only
a near-perfect r passes, and a near-perfect r over 3 or 4 points is what many hypotheses reach by
chance (over 3 points, |r| > 0.99 has p = 0.09 under no link) and what the t test's normality
cannot be checked on. n_min(1) = 5, n_min(10) = 8, n_min(100) = 10, n_min(165) = 11 (the STIR and
CKA families on 5 layers), n_min(630) = 12 (12 layers with subspace). Hypotheses with fewer
epochs keep their r and p in the table (``enough_epochs`` false) but are sorted after every
hypothesis with enough, and ``strongest`` and ``summary`` never put them first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import polars as pl

from invariance.io.layout import REDUCED_ROBUSTNESS_SEARCH
from invariance.io.schemas import rows_frame

STIR_COMBINATIONS: dict[str, pl.Expr] = {
    "forgetting": pl.col("forgetting_mean"),
    "learning": pl.col("learning_mean"),
    "sum": pl.col("forgetting_mean") + pl.col("learning_mean"),
    "difference": pl.col("forgetting_mean") - pl.col("learning_mean"),
}
CKA_COMBINATIONS: dict[str, pl.Expr] = {"cka_divergence": pl.col("cka_divergence_mean")}
# the paper's other baseline (Ramasesh et al.): subspace similarity of ft[i] and pt[i]
SUBSPACE_COMBINATIONS: dict[str, pl.Expr] = {"subspace_similarity": pl.col("subspace_similarity")}
FAMILIES = (("stir", STIR_COMBINATIONS), ("cka", CKA_COMBINATIONS), ("subspace", SUBSPACE_COMBINATIONS))


def _available(combinations: dict[str, pl.Expr], columns: list[str]) -> dict[str, pl.Expr]:
    """The combinations whose columns the curves have (a table without learning tests forgetting only)."""
    return {name: e for name, e in combinations.items() if set(e.meta.root_names()) <= set(columns)}
AGGREGATIONS = ("mean", "std", "min", "max")
HYPOTHESIS_KEYS = ["family", "combination", "layer_set", "aggregation"]
SEARCH_COLUMNS = [
    "run", *HYPOTHESIS_KEYS, "layers", "target", "n_epochs", "pearson_r", "p_value", "n_hypotheses", "p_bonferroni",
    "min_epochs", "enough_epochs",
]
SEARCH_SCHEMA = {
    "run": pl.String, **{key: pl.String for key in HYPOTHESIS_KEYS}, "layers": pl.List(pl.Int64), "target": pl.String,
    "n_epochs": pl.Int64, "pearson_r": pl.Float64, "p_value": pl.Float64, "n_hypotheses": pl.UInt32,
    "p_bonferroni": pl.Float64, "min_epochs": pl.Int64, "enough_epochs": pl.Boolean,
}
# the early-epoch curve starts at this many epochs (r of 2 points is always +-1)
EARLY_MIN_EPOCHS = 3
# the rule of what the data can carry: the epochs at which a link this strong would be significant
DETECTABLE_R = 0.9
FAMILY_P = 0.05  # Bonferroni-corrected p below this: a supported hypothesis


def p_of_r(r: float, n_epochs: int) -> float:
    """Two-sided p of a Pearson ``r`` over ``n_epochs`` points (Student t, n - 2 df; scipy's pearsonr)."""
    from scipy import stats

    df = n_epochs - 2
    t = abs(r) * np.sqrt(df) / np.sqrt(max(1.0 - r * r, 1e-300))
    return float(2 * stats.t.sf(t, df))


@lru_cache(maxsize=None)
def min_epochs(n_hypotheses: int, r: float = DETECTABLE_R, family_p: float = FAMILY_P) -> int:
    """The fewest epochs n at which a Pearson ``r`` (0.9) reaches Bonferroni p < ``family_p`` among
    ``n_hypotheses`` tested (at least 1): the rule of the module docstring. n_min(1) = 5."""
    m = max(1, int(n_hypotheses))
    n = EARLY_MIN_EPOCHS
    while p_of_r(r, n) * m >= family_p:
        n += 1
    return n


@dataclass(frozen=True)
class LayerSet:
    name: str
    layers: tuple[int, ...]


def layer_sets(layers: list[int]) -> list[LayerSet]:
    """Each single layer, then the first n and the last n layers for n = 2..L (the full set once)."""
    layers = sorted(layers)
    sets = [LayerSet(f"layer {layer}", (layer,)) for layer in layers]
    seen: set[tuple[int, ...]] = set()
    for n in range(2, len(layers) + 1):
        for name, chosen in ((f"first {n}", tuple(layers[:n])), (f"last {n}", tuple(layers[-n:]))):
            if chosen not in seen:
                seen.add(chosen)
                sets.append(LayerSet(name, chosen))
    return sets


def _aggregate(expression: pl.Expr, aggregation: str) -> pl.Expr:
    return {"mean": expression.mean(), "std": expression.std(ddof=0), "min": expression.min(),
            "max": expression.max(), "value": expression.first()}[aggregation]  # fmt: skip


def hypothesis_values(curves: pl.DataFrame) -> pl.DataFrame:
    """Per (epoch, hypothesis): ``value``, the aggregated metric; columns epoch, family,
    combination, layer_set, aggregation, layers, value."""
    frames = []
    for layer_set in layer_sets(curves["layer"].unique().to_list()):
        rows = curves.filter(pl.col("layer").is_in(layer_set.layers))
        aggregations = ("value",) if len(layer_set.layers) == 1 else AGGREGATIONS
        for family, all_combinations in FAMILIES:
            combinations = _available(all_combinations, curves.columns)
            if not combinations:
                continue
            wide = rows.group_by("epoch").agg(
                _aggregate(expression, aggregation).alias(f"{combination}|{aggregation}")
                for combination, expression in combinations.items()
                for aggregation in aggregations
            )
            frames.append(
                wide.unpivot(index="epoch", variable_name="hypothesis", value_name="value").select(
                    "epoch",
                    pl.lit(family).alias("family"),
                    pl.col("hypothesis").str.split("|").list.get(0).alias("combination"),
                    pl.lit(layer_set.name).alias("layer_set"),
                    pl.col("hypothesis").str.split("|").list.get(1).alias("aggregation"),
                    pl.lit(list(layer_set.layers), dtype=pl.List(pl.Int64)).alias("layers"),
                    pl.col("value").cast(pl.Float64),
                )
            )
    return pl.concat(frames).sort("epoch", *HYPOTHESIS_KEYS)


def accuracy_targets(run_metrics: pl.DataFrame) -> pl.DataFrame:
    """Per (epoch, target): ``accuracy``, the mean corrupted accuracy (target ``mean``) and the
    mean over corruptions at each severity (``severity 1`` ...), from a finetuning run's metrics."""
    mean = run_metrics.select("epoch", pl.lit("mean").alias("target"), pl.col("corrupted_accuracy").alias("accuracy"))
    corrupted = run_metrics.schema.get("corrupted")
    if not (isinstance(corrupted, pl.List) and isinstance(corrupted.inner, pl.Struct)):  # no per-corruption scores
        return mean.drop_nulls("accuracy")
    per_severity = (
        run_metrics.select("epoch", "corrupted")
        .explode("corrupted")
        .unnest("corrupted")
        .drop_nulls("accuracy")
        .group_by("epoch", "severity")
        .agg(pl.col("accuracy").mean())
        .select("epoch", pl.format("severity {}", "severity").alias("target"), "accuracy")
    )
    return pl.concat([mean, per_severity]).drop_nulls("accuracy").sort("target", "epoch")


def _pearson(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """(r, two-sided p) by scipy, or (None, None) where undefined (< 3 points, a constant series)."""
    from scipy import stats

    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < EARLY_MIN_EPOCHS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def search(curves: pl.DataFrame, run_metrics: pl.DataFrame, run: str) -> pl.DataFrame:
    """Every hypothesis against every accuracy target over the epochs of one run; columns
    SEARCH_COLUMNS, strongest (smallest corrected p, then largest |r|) first."""
    joined = hypothesis_values(curves).join(accuracy_targets(run_metrics), on="epoch", how="inner")
    rows = []
    for keys, group in joined.sort("epoch").group_by([*HYPOTHESIS_KEYS, "target"], maintain_order=True):
        r, p = _pearson(group["value"].to_numpy(), group["accuracy"].to_numpy())
        rows.append({**dict(zip([*HYPOTHESIS_KEYS, "target"], keys)), "layers": group["layers"][0].to_list(),
                     "n_epochs": group.height, "pearson_r": r, "p_value": p})  # fmt: skip
    if not rows:
        return pl.DataFrame(schema=SEARCH_SCHEMA)
    # typed by the schema, not inferred: r and p are null where a hypothesis is constant over the epochs
    row_schema = {name: SEARCH_SCHEMA[name] for name in (*HYPOTHESIS_KEYS, "target", "layers", "n_epochs", "pearson_r", "p_value")}
    table = rows_frame(rows, row_schema)
    return (
        table.with_columns(pl.lit(run).alias("run"), pl.col("p_value").is_not_null().sum().over("target").alias("n_hypotheses"))
        .with_columns(
            (pl.col("p_value") * pl.col("n_hypotheses")).clip(upper_bound=1.0).alias("p_bonferroni"),
            pl.col("n_hypotheses").map_elements(min_epochs, return_dtype=pl.Int64).alias("min_epochs"),
        )
        .with_columns((pl.col("n_epochs") >= pl.col("min_epochs")).alias("enough_epochs"))
        .select(SEARCH_COLUMNS)
        .sort(["target", "enough_epochs", "p_bonferroni", pl.col("pearson_r").abs()], descending=[False, True, False, True],
              nulls_last=True)  # fmt: skip
    )


def _with_rule(table: pl.DataFrame) -> pl.DataFrame:
    """``table`` with ``min_epochs`` and ``enough_epochs`` (tables written before the rule lack them)."""
    if "enough_epochs" in table.columns:
        return table
    return table.with_columns(
        pl.col("n_hypotheses").map_elements(min_epochs, return_dtype=pl.Int64).alias("min_epochs")
    ).with_columns((pl.col("n_epochs") >= pl.col("min_epochs")).alias("enough_epochs"))


def strongest(table: pl.DataFrame, n: int = 5, target: str = "mean", *, supported_only: bool = False) -> pl.DataFrame:
    """The ``n`` strongest hypotheses per run for ``target``: those with enough epochs
    (``enough_epochs``) first, then by smallest corrected p, ties by largest |r|; a hypothesis from
    too few epochs comes only after every one with enough (``supported_only``: never, and only
    those with Bonferroni p < FAMILY_P)."""
    rows = _with_rule(table).filter((pl.col("target") == target) & pl.col("pearson_r").is_not_null())
    if supported_only:
        rows = rows.filter(pl.col("enough_epochs") & (pl.col("p_bonferroni") < FAMILY_P))
    # per run its n strongest; then every run's hypotheses with enough epochs before any without
    return (
        rows.sort(["run", "enough_epochs", "p_bonferroni", pl.col("pearson_r").abs()], descending=[False, True, False, True])
        .group_by("run", maintain_order=True)
        .head(n)
        .sort(["enough_epochs", "run", "p_bonferroni", pl.col("pearson_r").abs()], descending=[True, False, False, True],
              maintain_order=True)  # fmt: skip
        .select(rows.columns)
    )


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def describe(row: dict) -> str:
    """One hypothesis in words: ``max of learning over last 3 (layers 2, 3, 4)``."""
    what = row["combination"].replace("_", " ")
    how = "" if row["aggregation"] == "value" else f"{row['aggregation']} of "
    layers = ", ".join(str(k) for k in row["layers"]) if row["layers"] is not None else ""
    where = row["layer_set"] if row["layer_set"].startswith("layer ") else f"{row['layer_set']} (layers {layers})"
    return f"{how}{what} over {where}" if how else f"{what} at {where}"


def rule_text(n_hypotheses: int | None = None) -> str:
    """The rule in one sentence (with its n_min for ``n_hypotheses``)."""
    here = f" (here n_min({n_hypotheses}) = {min_epochs(n_hypotheses)})" if n_hypotheses else ""
    return (f"rule: r over n epochs counts only when n >= n_min(m), the n at which r = {DETECTABLE_R} would reach "
            f"Bonferroni p < {FAMILY_P} among the m hypotheses tested{here}")  # fmt: skip


def summary(table: pl.DataFrame, target: str = "mean", n: int = 3, where: str = REDUCED_ROBUSTNESS_SEARCH) -> str:
    """A few lines for stdout: how many hypotheses were tested against ``target`` (the mean
    corrupted accuracy), how many have enough epochs by the rule, the ``n`` strongest supported
    ones (enough epochs, Bonferroni p < FAMILY_P) or a sentence saying none is, the rule, and
    where the full table is (``where``, under the output prefix)."""
    rows = _with_rule(table).filter((pl.col("target") == target) & pl.col("pearson_r").is_not_null()) if len(table) else table
    against = "the mean corrupted accuracy" if target == "mean" else f"corrupted accuracy at {target}"
    if rows.is_empty():
        return (f"robustness search: no hypothesis could be tested against {against} (a run needs its accuracies "
                f"on corrupted images for {EARLY_MIN_EPOCHS}+ epochs, with variation); table: {where}")  # fmt: skip
    runs = rows["run"].unique().to_list()
    per_run = rows.group_by("run").agg(pl.len().alias("m"), pl.col("n_epochs").max().alias("n"), pl.col("min_epochs").max())
    enough = rows.filter(pl.col("enough_epochs"))
    in_runs = f" in {len(runs)} runs" if len(runs) > 1 else ""
    lines = [
        f"robustness search: {rows.height} hypotheses tested against {against}{in_runs}, over "
        f"{_span(per_run['n'].to_list())} epochs; {enough.height} of them from enough epochs "
        f"(n_min = {_span(per_run['min_epochs'].to_list())})."
    ]
    supported = strongest(rows, n=n, target=target, supported_only=True).sort("p_bonferroni", pl.col("pearson_r").abs(),
                                                                               descending=[False, True]).head(n)  # fmt: skip
    if supported.is_empty():
        reason = ("no run has that many epochs; the r over fewer epochs are in the table, listed apart "
                  "(enough_epochs false)") if enough.is_empty() else f"none reaches Bonferroni p < {FAMILY_P}"
        lines.append(f"No hypothesis is supported: {reason}.")
    else:
        lines.append("strongest supported:")
        for row in supported.iter_rows(named=True):
            run = f"run {row['run']}: " if row["run"] else ""
            lines.append(f"  {run}{describe(row)}: r = {row['pearson_r']:.3f} (n = {row['n_epochs']} epochs), "
                         f"Bonferroni p = {row['p_bonferroni']:.2g} of {row['n_hypotheses']} tested")  # fmt: skip
    lines.append(rule_text(int(per_run["m"].max())) + ".")
    lines.append(f"table: {where}")
    return "\n".join(lines)


def early_epochs(curves: pl.DataFrame, run_metrics: pl.DataFrame, run: str, hypotheses: pl.DataFrame) -> pl.DataFrame:
    """Fig. 14: for each of ``hypotheses`` (rows of ``search``), Pearson r against the mean corrupted
    accuracy over the first n epochs of the run, for n = 3 .. all; columns run, the hypothesis
    keys, up_to_epoch, n_epochs, pearson_r."""
    joined = (
        hypothesis_values(curves)
        .join(hypotheses.select(HYPOTHESIS_KEYS), on=HYPOTHESIS_KEYS, how="semi")
        .join(accuracy_targets(run_metrics).filter(pl.col("target") == "mean"), on="epoch", how="inner")
        .sort("epoch")
    )
    rows = []
    for keys, group in joined.group_by(HYPOTHESIS_KEYS, maintain_order=True):
        epochs, values, accuracy = (group[c].to_numpy() for c in ("epoch", "value", "accuracy"))
        for end in range(EARLY_MIN_EPOCHS, len(epochs) + 1):
            r, _ = _pearson(values[:end], accuracy[:end])
            rows.append({"run": run, **dict(zip(HYPOTHESIS_KEYS, keys)), "up_to_epoch": int(epochs[end - 1]),
                         "n_epochs": end, "pearson_r": r})  # fmt: skip
    schema = {"run": pl.String, **{k: pl.String for k in HYPOTHESIS_KEYS}, "up_to_epoch": pl.Int64,
              "n_epochs": pl.Int64, "pearson_r": pl.Float64}  # fmt: skip
    return rows_frame(rows, schema)
