"""What the layer-pair measures share (CKA, Procrustes, a user's function): rows per (model_a,
layer_a, model_b, layer_b), one reduced table of every complete point, and the layer x layer
heatmap of pt against ft per checkpoint (``plots/<measure>/epoch=<e>.png``; a study's run:
``plots/runs/<run>/<measure>/epoch=<e>.png``)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import matplotlib.colors
import numpy as np
import polars as pl
from matplotlib.figure import Figure

from invariance.analysis import metrics, plots
from invariance.io.layout import measure_plot_key
from invariance.io.schemas import POINT_SCHEMA, PROVENANCE_SCHEMA
from invariance.measures.base import Figure, ReduceContext, partition_key, run_title

PAIR_COLUMNS = ["model_a", "layer_a", "model_b", "layer_b"]


def pair_schema(value: str) -> dict[str, Any]:
    """The shard columns of a layer-pair measure whose value column is ``value``."""
    return {**POINT_SCHEMA, "model_a": pl.String, "layer_a": pl.Int64, "model_b": pl.String, "layer_b": pl.Int64,
            value: pl.Float64, "n_samples": pl.Int64, **PROVENANCE_SCHEMA}  # fmt: skip


def pair_table(rows: pl.DataFrame, values: Sequence[str], settings: str) -> pl.DataFrame:
    """The reduced table of a layer-pair measure: every row of its complete points, with the
    settings hash that keyed them."""
    if rows.is_empty():
        return rows
    return (
        rows.select(*metrics.CHECKPOINT_KEYS, *PAIR_COLUMNS, *values, "n_samples")
        .with_columns(pl.lit(settings).alias("settings"))
        .sort("run", "epoch", "alpha", *PAIR_COLUMNS)
    )


def layer_label(layer: int, layer_names: Sequence[str] | None) -> str:
    """``3`` or, where the model names its layers, ``3 blocks.2`` / ``4 pre-logits``."""
    if layer_names and 0 <= layer < len(layer_names):
        return f"{layer} {layer_names[layer]}"
    return str(layer)


def heatmap_figure(rows: pl.DataFrame, value: str, title: str, colorbar: str, *, low: float | None = None,
                   high: float | None = None, cmap: str = "viridis",
                   layer_names: Sequence[str] | None = None) -> Figure:  # fmt: skip
    """The layer x layer matrix of ``value`` between pt (rows, model_a) and ft (columns, model_b)
    of one point: ``rows`` holds that point's pt-ft pairs. The diagonal (layer i of both) is
    outlined; each cell is printed where the matrix is small enough to read."""
    pairs = rows.filter((pl.col("model_a") == "pt") & (pl.col("model_b") == "ft"))
    pt_layers = sorted(set(pairs["layer_a"].to_list()))
    ft_layers = sorted(set(pairs["layer_b"].to_list()))
    matrix = np.full((len(pt_layers), len(ft_layers)), np.nan)
    for a, b, v in pairs.select("layer_a", "layer_b", value).iter_rows():
        matrix[pt_layers.index(a), ft_layers.index(b)] = np.nan if v is None else v
    figure = plots.new_figure(figsize=(1.6 + 0.5 * max(4, len(ft_layers)), 1.2 + 0.45 * max(4, len(pt_layers))))
    axes = figure.add_subplot()
    finite = matrix[np.isfinite(matrix)]
    norm = matplotlib.colors.Normalize(low if low is not None else (finite.min() if finite.size else 0.0),
                                       high if high is not None else (finite.max() if finite.size else 1.0))  # fmt: skip
    image = axes.imshow(matrix, cmap=cmap, norm=norm, origin="lower", aspect="auto")
    axes.set_xticks(range(len(ft_layers)), [layer_label(layer, layer_names) for layer in ft_layers], rotation=60,
                    ha="right", fontsize=7)  # fmt: skip
    axes.set_yticks(range(len(pt_layers)), [layer_label(layer, layer_names) for layer in pt_layers], fontsize=7)
    axes.set_xlabel("finetuned layer j")
    axes.set_ylabel("pretrained layer i")
    axes.set_title(title, fontsize=10)
    for position, layer in enumerate(pt_layers):
        if layer in ft_layers:
            axes.add_patch(plots_rectangle(ft_layers.index(layer), position))
    if matrix.size <= 144:
        for (i, j), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                axes.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                          color="white" if norm(v) < 0.5 else "black")  # fmt: skip
    figure.colorbar(image, ax=axes, label=colorbar)
    return figure


def plots_rectangle(x: int, y: int) -> Any:
    """The outline of the diagonal cell (x, y)."""
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2)


def heatmap_figures(context: ReduceContext, measure: str, table: pl.DataFrame, value: str, label: str, what: str,
                    **style: Any) -> list[Figure]:  # fmt: skip
    """A heatmap per complete checkpoint (its own rows, alpha 1) into ``plots/``; the report shows
    each run's last one, titled ``what`` (e.g. "CKA between pretrained and finetuned layers")."""
    if not context.make_plots or table.is_empty():
        return []
    names = context.plan.layer_names
    complete = set(context.complete)
    figures = []
    plain = metrics.plain(table)
    points = set(plain.select("run", "epoch").unique().iter_rows())

    def point_rows(run: str, epoch: int) -> pl.DataFrame:  # built only to hash or draw: not per unchanged epoch
        return plain.filter((pl.col("run") == run) & (pl.col("epoch") == epoch))

    for run in dict.fromkeys(run for run, _ in context.complete):
        drawn = sorted(epoch for (done_run, epoch) in points if done_run == run and (run, epoch) in complete)
        for epoch in drawn:  # a measure that is not gating: a checkpoint's shard may still be to compute
            rows = functools.partial(point_rows, run, epoch)
            title = f"{run_title(run)}{what}, epoch {epoch}"
            figures.append(Figure(
                measure_plot_key(measure, epoch, run), rows,
                lambda rows=rows, title=title: plots.png_bytes(heatmap_figure(rows(), value, title, label, layer_names=names, **style)),
                title=f"{run_title(run)}{what} at epoch {epoch} (diagonal outlined)" if epoch == drawn[-1] else None,
                extra=repr(sorted(style.items())), partition=partition_key(run, epoch),
            ))  # fmt: skip
    return figures
