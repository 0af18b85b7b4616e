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

from typing import TYPE_CHECKING, Any, Sequence, TypeVar

import polars as pl

from invariance.analysis.plots import MARKERS, PRE_LOGITS, is_pre_logits, new_figure, note_coinciding, png_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)
FIRST_SPREAD_LAYER = 2
# below this many epochs the plot warns that its r says little: a Pearson r of 0.9 reaches
# p < 0.05 from 5 epochs on (robustness_search.min_epochs(1), the search's rule for one test)
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


def robustness_png(table: pl.DataFrame, correlation: pl.DataFrame, depth: int, **names: Any) -> bytes:
    return png_bytes(robustness_figure(table, correlation, depth, **names))


# the two quantities of the left panel, each with its own axis in its own colour
SPREAD_COLOR, SCORE_COLOR = "tab:blue", "tab:red"


def _r_label(run: str, r: float | None, n: int) -> str:
    """``r = 0.992, 95% interval [0.61, 1.00] (n = 4 epochs)``, after the run's name in a study (an
    unnamed single run has none); the interval of r (Fisher z) from 4 epochs on."""
    name = f"{run}: " if run else ""
    if r is None:
        return f"{name}r undefined (n = {n} epochs)"
    interval = ""
    if n >= 4 and abs(r) < 1:
        import numpy as np
        from scipy import stats

        half = stats.norm.ppf(0.975) / np.sqrt(n - 3)
        low, high = np.tanh(np.arctanh(r) - half), np.tanh(np.arctanh(r) + half)
        interval = f", 95% interval [{low:.2f}, {high:.2f}]"
    return f"{name}r = {r:.3f}{interval} (n = {n} epochs)"


def _spread_name(depth: int, layer_names: Sequence[str] | None) -> str:
    """``std of forgetting over layers 2..12 (12: pre-logits)``."""
    first, last = spread_layers(depth)
    suffix = f" ({last}: {PRE_LOGITS})" if is_pre_logits(last, layer_names, depth) else ""
    return f"std of forgetting over layers {first}..{last}{suffix}"


def robustness_figure(table: pl.DataFrame, correlation: pl.DataFrame, depth: int, *,
                      layer_names: Sequence[str] | None = None) -> "Figure":  # fmt: skip
    """Left: forgetting spread (left axis, blue, solid) and corrupted accuracy (right axis, red,
    dashed) across epochs, one marker per run; right: one against the other, a colour per run, with
    Pearson r and its 95% interval. ``layer_names`` (a plan's) say whether the last layer of the
    spread is the pre-logits (default: layer ``depth`` is)."""
    import matplotlib.lines
    import matplotlib.ticker

    by_accuracy = table["corrupted_accuracy_mean"].is_not_null().any()
    score, score_label = (
        ("corrupted_accuracy_mean", "mean corrupted accuracy") if by_accuracy
        else ("corrupted_loss_mean", "mean corrupted loss")
    )  # fmt: skip
    spread_name = _spread_name(depth, layer_names)
    figure = new_figure(figsize=(13, 4.4))
    over_epochs, scatter = figure.subplots(1, 2)
    accuracy_axis = over_epochs.twinx()
    grouped = list(table.sort("epoch").group_by("run", maintain_order=True))
    several = len(grouped) > 1
    spreads, scores, run_handles = {}, {}, []
    for index, (run, rows) in enumerate(grouped):
        run = run[0] or ""
        marker = MARKERS[index % len(MARKERS)]
        color = f"C{index % 10}" if several else "black"
        r = correlation.filter(pl.col("run") == run)["pearson_r" if by_accuracy else "pearson_r_loss"][0]
        label = _r_label(run, r, rows.height)
        epochs = rows["epoch"].to_numpy()
        over_epochs.plot(epochs, rows["forgetting_std_across_layers"].to_numpy(), marker=marker, ms=4, color=SPREAD_COLOR,
                         label=f"_spread {run}")  # fmt: skip
        accuracy_axis.plot(epochs, rows[score].to_numpy(), marker=marker, ms=4, ls="--", color=SCORE_COLOR, label=f"_score {run}")
        spreads[run or "the run"] = (epochs, rows["forgetting_std_across_layers"].cast(pl.Float64).to_numpy())
        scores[run or "the run"] = (epochs, rows[score].cast(pl.Float64).to_numpy())
        if several:
            run_handles.append(matplotlib.lines.Line2D([], [], ls="none", marker=marker, color="grey", label=run))
        scatter.scatter(rows["forgetting_std_across_layers"].to_numpy(), rows[score].to_numpy(), color=color,
                        marker=marker, label=label)  # fmt: skip
        for epoch, x, y in rows.select("epoch", "forgetting_std_across_layers", score).iter_rows():
            scatter.annotate(str(epoch), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if several:
        note_coinciding(over_epochs, {f"{name} (spread)": line for name, line in spreads.items()})
        note_coinciding(accuracy_axis, {f"{name} ({score_label})": line for name, line in scores.items()}, height=0.07)
        note_coinciding(scatter, {name: (spreads[name][1], scores[name][1]) for name in spreads})
    over_epochs.set_xlabel("checkpoint epoch")
    over_epochs.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    over_epochs.set_ylabel(f"{spread_name}\n(left axis, solid)", color=SPREAD_COLOR)
    accuracy_axis.set_ylabel(f"{score_label} (right axis, dashed)", color=SCORE_COLOR)
    over_epochs.tick_params(axis="y", colors=SPREAD_COLOR)
    accuracy_axis.tick_params(axis="y", colors=SCORE_COLOR)
    accuracy_axis.spines["left"].set_color(SPREAD_COLOR)
    accuracy_axis.spines["right"].set_color(SCORE_COLOR)
    # on the twin axis, drawn last: a legend on the first axis lies under the right axis' lines
    quantities = [
        matplotlib.lines.Line2D([], [], color=SPREAD_COLOR, marker="o", ms=4, label="forgetting spread (left axis)"),
        matplotlib.lines.Line2D([], [], color=SCORE_COLOR, marker="o", ms=4, ls="--", label=f"{score_label} (right axis)"),
    ]
    accuracy_axis.legend(handles=quantities + run_handles, fontsize=8, title="run (marker)" if several else None, framealpha=0.7)
    over_epochs.set_title("over the checkpoint epochs (no interval: one value per epoch)", fontsize=10)
    over_epochs.grid(alpha=0.3)
    scatter.set_xlabel(spread_name)
    scatter.set_ylabel(score_label)
    scatter.set_title("robustness link (Pearson r over epochs)", fontsize=10)
    scatter.legend(fontsize=8, framealpha=0.7)
    fewest = int(correlation["n_epochs"].min())
    if fewest < MIN_TRUSTED_EPOCHS:
        figure.suptitle(f"caution: r from {fewest} epoch{'s' if fewest != 1 else ''}; below {MIN_TRUSTED_EPOCHS} "
                        "epochs a Pearson r cannot reach p < 0.05 even at r = 0.9", color="firebrick", fontsize=10)  # fmt: skip
    scatter.grid(alpha=0.3)
    return figure
