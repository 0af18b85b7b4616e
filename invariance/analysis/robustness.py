"""The robustness link of the finetuning paper, as Polars functions over the reduced curves.

Per checkpoint epoch, the spread of forgetting across layers (standard deviation of the
forgetting curve over layers 2..depth; the paper: layers 2..12 of ViT-B/32, whose layer 12
is the pre-logits) is set beside the mean accuracy on corrupted test sets, and the two are
correlated over the epochs of a run (Pearson; the paper: 0.78 on CIFAR-10, 0.877 on
CIFAR-100). A model with fewer than 3 blocks has no layers 2..depth worth the name: then
every layer of the curve counts. The standard deviation is the population one (ddof=0);
Pearson's r does not change with that choice.

The per-epoch accuracies come from a finetuning run's ``metrics/epoch=NN.parquet`` beside
its checkpoints (read by ``invariance.io.run_metrics``); these functions take them as frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import polars as pl

from invariance.analysis.plots import new_figure, png_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)
FIRST_SPREAD_LAYER = 2
# below this many epochs the plot warns that its r says little
MIN_TRUSTED_EPOCHS = 5


def spread_layers(depth: int) -> tuple[int, int]:
    """(first, last) layer whose forgetting enters the spread: 2..depth, or 0..depth when depth < 3."""
    return (FIRST_SPREAD_LAYER if depth >= 3 else 0), depth


def forgetting_spread(curves: Frame, depth: int) -> Frame:
    """Per (checkpoint, epoch): ``forgetting_std_across_layers`` of ``forgetting_mean`` and ``n_layers``."""
    first, last = spread_layers(depth)
    return (
        curves.filter(pl.col("layer").is_between(first, last))
        .group_by("checkpoint", "epoch")
        .agg(
            pl.col("forgetting_mean").std(ddof=0).alias("forgetting_std_across_layers"),
            pl.len().alias("n_layers"),
        )
    )


def robustness_table(curves: Frame, run_metrics: Frame, depth: int, run: str) -> Frame:
    """Per epoch with both a curve and metrics: run, epoch, checkpoint, forgetting_std_across_layers,
    corrupted_accuracy_mean, clean_accuracy, corrupted_loss_mean, n_layers."""
    accuracies = run_metrics.select(
        "epoch",
        pl.col("corrupted_accuracy").alias("corrupted_accuracy_mean"),
        "clean_accuracy",
        pl.col("corrupted_loss").alias("corrupted_loss_mean"),
    )
    return (
        forgetting_spread(curves, depth)
        .join(accuracies, on="epoch", how="inner")
        .select(
            pl.lit(run).alias("run"), "epoch", "checkpoint", "forgetting_std_across_layers",
            "corrupted_accuracy_mean", "clean_accuracy", "corrupted_loss_mean", "n_layers",
        )  # fmt: skip
        .sort("run", "epoch")
    )


def _pearson(x: str, y: str) -> pl.Expr:
    both = pl.col(x).is_not_null() & pl.col(y).is_not_null()
    return pl.corr(pl.col(x).filter(both), pl.col(y).filter(both)).fill_nan(None)


def robustness_correlation(table: Frame) -> Frame:
    """Per run: ``pearson_r`` of forgetting spread vs mean corrupted accuracy over epochs,
    ``pearson_r_loss`` vs mean corrupted loss (the score of reconstruction runs), ``n_epochs``.
    Null where undefined (fewer than 2 epochs, or a constant series)."""
    return (
        table.group_by("run")
        .agg(
            _pearson("forgetting_std_across_layers", "corrupted_accuracy_mean").alias("pearson_r"),
            _pearson("forgetting_std_across_layers", "corrupted_loss_mean").alias("pearson_r_loss"),
            pl.len().alias("n_epochs"),
        )
        .sort("run")
    )


def robustness_png(table: pl.DataFrame, correlation: pl.DataFrame, depth: int) -> bytes:
    return png_bytes(robustness_figure(table, correlation, depth))


def robustness_figure(table: pl.DataFrame, correlation: pl.DataFrame, depth: int) -> "Figure":
    """Left: forgetting spread and corrupted accuracy across epochs; right: one against the other."""
    import matplotlib.ticker

    by_accuracy = table["corrupted_accuracy_mean"].is_not_null().any()
    score, score_label = (
        ("corrupted_accuracy_mean", "mean corrupted accuracy") if by_accuracy
        else ("corrupted_loss_mean", "mean corrupted loss")
    )  # fmt: skip
    first, last = spread_layers(depth)
    figure = new_figure(figsize=(12, 4.2))
    over_epochs, scatter = figure.subplots(1, 2)
    accuracy_axis = over_epochs.twinx()
    for index, (run, rows) in enumerate(table.sort("epoch").group_by("run", maintain_order=True)):
        color = f"C{index}"
        name = run[0] or "run"  # one run without {run}: ""
        r = correlation.filter(pl.col("run") == run[0])["pearson_r" if by_accuracy else "pearson_r_loss"][0]
        n = rows.height
        label = f"{name}  r = {r:.3f} (n = {n} epochs)" if r is not None else f"{name}  r undefined (n = {n} epochs)"
        epochs = rows["epoch"].to_numpy()
        over_epochs.plot(epochs, rows["forgetting_std_across_layers"].to_numpy(), marker="o", ms=3, color=color, label=label)
        accuracy_axis.plot(epochs, rows[score].to_numpy(), marker="s", ms=3, ls="--", color=color)
        scatter.scatter(rows["forgetting_std_across_layers"].to_numpy(), rows[score].to_numpy(), color=color, label=label)
        for epoch, x, y in rows.select("epoch", "forgetting_std_across_layers", score).iter_rows():
            scatter.annotate(str(epoch), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    over_epochs.set_xlabel("checkpoint epoch")
    over_epochs.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    over_epochs.set_ylabel(f"std of forgetting over layers {first}..{last} (solid)")
    accuracy_axis.set_ylabel(f"{score_label} (dashed)")
    over_epochs.legend(fontsize=8)
    over_epochs.grid(alpha=0.3)
    scatter.set_xlabel(f"std of forgetting over layers {first}..{last}")
    scatter.set_ylabel(score_label)
    scatter.set_title("robustness link (Pearson r over epochs)", fontsize=10)
    fewest = int(correlation["n_epochs"].min())
    if fewest < MIN_TRUSTED_EPOCHS:
        figure.suptitle(f"caution: r from {fewest} epoch{'s' if fewest != 1 else ''}; below {MIN_TRUSTED_EPOCHS} "
                        "epochs a Pearson r says little", color="firebrick", fontsize=10)  # fmt: skip
    scatter.grid(alpha=0.3)
    return figure
