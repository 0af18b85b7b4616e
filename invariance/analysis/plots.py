"""Plots of the reduced tables, rendered to PNG bytes.

matplotlib's object API only (``matplotlib.figure.Figure`` with its own Agg canvas): nothing
here touches pyplot or switches the backend of a notebook that imports the library.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import matplotlib
import matplotlib.cm
import matplotlib.colors
import matplotlib.lines
import matplotlib.patches
import matplotlib.ticker
import numpy as np
import polars as pl
from matplotlib.figure import Figure

CURVE_METRICS = (
    ("forgetting", "forgetting  STIR(pt|pt) - STIR(ft|pt)"),
    ("learning", "learning  STIR(ft|ft) - STIR(pt|ft)"),
    ("cka_divergence", "CKA divergence  1 - CKA(ft, pt)"),
)


def new_figure(**kwargs: Any) -> Figure:
    """A figure outside pyplot (garbage-collected like any object), laid out with constrained layout."""
    return Figure(layout="constrained", **kwargs)


def png_bytes(figure: Figure) -> bytes:
    """``figure`` as PNG bytes (Figure.savefig makes its own Agg canvas)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


BAND_LABEL = "shaded: ±1 std over seeds"
ALPHA_LABEL = "alpha  ((1 - alpha) pretrained + alpha finetuned)"
# up to this many epochs (or layers) get a legend entry each; more get a discrete colour bar
LEGEND_LIMIT = 12


def _discrete_colors(values: list[int], colormap: str) -> tuple[dict[int, tuple], matplotlib.colors.Colormap,
                                                                matplotlib.colors.BoundaryNorm]:  # fmt: skip
    """One colour per integer value (epochs, layers), and the discrete norm of their colour bar."""
    cmap = matplotlib.colormaps[colormap].resampled(max(2, len(values)))
    bounds = np.arange(len(values) + 1) - 0.5
    norm = matplotlib.colors.BoundaryNorm(bounds, cmap.N)
    return {value: cmap(norm(position)) for position, value in enumerate(values)}, cmap, norm


def _discrete_key(figure: Figure, axes: Any, values: list[int], colors: dict[int, tuple], cmap: Any, norm: Any,
                  name: str, band: bool = False, markers: str = "o", extra: Sequence[Any] = (),
                  title: str | None = None) -> None:  # fmt: skip
    """A legend entry per value (``markers[i]`` for the i-th) when few, else a colour bar with one
    tick per value; ``band``: the shaded band is named; ``extra``: legend handles shown either way."""
    handles = list(extra)
    if len(values) <= LEGEND_LIMIT:
        handles += [matplotlib.lines.Line2D([], [], color=colors[v], marker=markers[i % len(markers)], ms=4,
                                            label=f"{name} {v}") for i, v in enumerate(values)]  # fmt: skip
        if band:
            handles.append(matplotlib.patches.Patch(color="grey", alpha=0.25, label=BAND_LABEL))
    else:
        colorbar = figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9)
        colorbar.set_ticks(np.arange(len(values)), labels=[str(v) for v in values])
        colorbar.set_label(f"{name} ({BAND_LABEL})" if band else name)
    if handles:
        figure.legend(handles=handles, loc="outside right center", fontsize=8, title=title or name)


def _metric_axes(figure: Figure, xlabel: str) -> list[tuple[Any, str]]:
    """The three panels of forgetting, learning and CKA divergence, labelled, with the zero line:
    [(axis, metric)]."""
    panels = []
    for axis, (metric, label) in zip(figure.subplots(1, 3), CURVE_METRICS):
        axis.axhline(0.0, color="grey", lw=0.6)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(metric.replace("_", " ") + " (mean over seeds)")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
        panels.append((axis, metric))
    return panels


def layer_curves_figure(curves: pl.DataFrame, title: str = "") -> Figure:
    """Per-layer curves, one line per checkpoint epoch (mean over seeds, band = ±1 std over seeds)."""
    epochs = sorted(curves["epoch"].unique().to_list())
    colors, cmap, norm = _discrete_colors(epochs, "viridis")
    figure = new_figure(figsize=(16, 4.2))
    panels = _metric_axes(figure, "layer (last = pre-logits)")
    for axis, metric in panels:
        for epoch in epochs:
            rows = curves.filter(pl.col("epoch") == epoch).sort("layer")
            layers = rows["layer"].to_numpy()
            mean = rows[f"{metric}_mean"].to_numpy()
            std = rows[f"{metric}_std"].fill_null(0.0).to_numpy()
            axis.plot(layers, mean, marker="o", ms=3, color=colors[epoch], lw=1.5)
            axis.fill_between(layers, mean - std, mean + std, color=colors[epoch], alpha=0.12, lw=0)
        axis.set_xticks(sorted(curves["layer"].unique().to_list()))
    axes = [axis for axis, _ in panels]
    _discrete_key(figure, axes, epochs, colors, cmap, norm, "epoch", band=True)
    if title:
        figure.suptitle(title)
    return figure


def _readable_near_zero(axis: Any, values: np.ndarray) -> None:
    """Symmetric-log y scale when the lines span decades (early layers' small values stay apart)."""
    finite = np.abs(values[np.isfinite(values) & (values != 0)])
    if len(finite) and finite.max() / max(finite.min(), 1e-12) > 100:
        axis.set_yscale("symlog", linthresh=float(max(np.quantile(finite, 0.1), 1e-6)))
        if np.nanmin(values) >= 0:  # no negative half when nothing is negative
            axis.set_ylim(bottom=0)
        axis.set_ylabel(axis.get_ylabel() + "\n(symmetric log scale)")


def dynamics_figure(curves: pl.DataFrame, title: str = "") -> Figure:
    """Each metric across checkpoint epochs, one line (colour and marker) per layer."""
    layers = sorted(curves["layer"].unique().to_list())
    colors, cmap, norm = _discrete_colors(layers, "turbo")
    markers = "os^vD<>pX*h"
    figure = new_figure(figsize=(16, 4.2))
    panels = _metric_axes(figure, "checkpoint epoch")
    for axis, metric in panels:
        for position, layer in enumerate(layers):
            rows = curves.filter(pl.col("layer") == layer).sort("epoch")
            axis.plot(rows["epoch"].to_numpy(), rows[f"{metric}_mean"].to_numpy(), marker=markers[position % len(markers)],
                      ms=4, color=colors[layer], lw=1.3)  # fmt: skip
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        _readable_near_zero(axis, curves[f"{metric}_mean"].cast(pl.Float64).to_numpy())
    _discrete_key(figure, [axis for axis, _ in panels], layers, colors, cmap, norm, "layer", markers=markers)
    if title:
        figure.suptitle(title)
    return figure


def flow_color_limit(flow: pl.DataFrame) -> float:
    """The colour range of every flow heatmap of a table: ±max |flow| over all its epochs, so that
    heatmaps of different epochs compare."""
    values = flow["flow"].cast(pl.Float64).to_numpy() if len(flow) else np.array([])
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if len(finite) and finite.max() > 0 else 1.0


def checkpoint_title(checkpoint: str, epoch: int) -> str:
    """``epoch 3``, with the checkpoint's name only where it says more than the epoch."""
    plain = {f"epoch={epoch}", f"epoch={epoch:02d}", f"epoch={epoch:03d}"}
    return f"epoch {epoch}" if not checkpoint or checkpoint in plain else f"epoch {epoch} ({checkpoint})"


def flow_figure(flow: pl.DataFrame, epoch: int) -> Figure:
    """Invariance flow matrix of one checkpoint (rows pt layer i, columns ft layer j), on the colour
    range shared by every epoch of ``flow``; the diagonal (0 by definition) is outlined."""
    rows = flow.filter(pl.col("epoch") == epoch)
    pt_layers = sorted(rows["pt_layer"].unique().to_list())
    ft_layers = sorted(rows["ft_layer"].unique().to_list())
    matrix = np.full((len(pt_layers), len(ft_layers)), np.nan)
    for pt_layer, ft_layer, value in rows.select("pt_layer", "ft_layer", "flow").iter_rows():
        matrix[pt_layers.index(pt_layer), ft_layers.index(ft_layer)] = value
    limit = flow_color_limit(flow)
    figure = new_figure(figsize=(6.4, 5))
    axis = figure.subplots()
    image = axis.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, origin="upper")
    for position, layer in enumerate(pt_layers):
        if layer in ft_layers:
            column = ft_layers.index(layer)
            axis.add_patch(matplotlib.patches.Rectangle((column - 0.5, position - 0.5), 1, 1, fill=False,
                                                        edgecolor="black", lw=1.0))  # fmt: skip
    axis.set_xticks(range(len(ft_layers)), ft_layers)
    axis.set_yticks(range(len(pt_layers)), pt_layers)
    axis.set_xlabel("finetuned layer j")
    axis.set_ylabel("pretrained layer i")
    checkpoint = rows["checkpoint"][0] if len(rows) else ""
    axis.set_title(f"invariance flow  STIR(ft[j]|pt[i]) - STIR(ft[i]|pt[i]),  {checkpoint_title(checkpoint, epoch)}\n"
                   "left of the outlined diagonal > 0: compression; right: expansion", fontsize=9)  # fmt: skip
    figure.colorbar(image, ax=axis, label="flow (mean over seeds; one range for every epoch)")
    return figure


def layer_curves_png(curves: pl.DataFrame, title: str = "") -> bytes:
    return png_bytes(layer_curves_figure(curves, title))


def dynamics_png(curves: pl.DataFrame, title: str = "") -> bytes:
    return png_bytes(dynamics_figure(curves, title))


def flow_heatmap_png(flow: pl.DataFrame, epoch: int) -> bytes:
    return png_bytes(flow_figure(flow, epoch))


# ---------------------------------------------------------------------------------------------
# weight paths (interpolation.alphas) and kNN probes


def interpolation_figure(curves: pl.DataFrame, epoch: int) -> Figure:
    """Forgetting, learning and CKA divergence against alpha for the checkpoint of ``epoch``, one
    line per layer (alpha 0: the pretrained weights, 1: the checkpoint)."""
    rows = curves.filter(pl.col("epoch") == epoch)
    layers = sorted(rows["layer"].unique().to_list())
    colors, cmap, norm = _discrete_colors(layers, "turbo")
    figure = new_figure(figsize=(16, 4.2))
    panels = _metric_axes(figure, ALPHA_LABEL)
    for axis, metric in panels:
        for layer in layers:
            line = rows.filter(pl.col("layer") == layer).sort("alpha")
            axis.plot(line["alpha"].to_numpy(), line[f"{metric}_mean"].to_numpy(), marker="o", ms=3, color=colors[layer], lw=1.3)
        axis.set_xlim(-0.02, 1.02)
    _discrete_key(figure, [axis for axis, _ in panels], layers, colors, cmap, norm, "layer")
    checkpoint = rows["checkpoint"][0] if len(rows) else ""
    figure.suptitle(f"along the weight path to {checkpoint_title(checkpoint, epoch)}")
    return figure


def _first_k(knn: pl.DataFrame) -> int:
    """The k the kNN plots show: 20 (DINO's usual best) when asked, else the smallest."""
    ks = sorted(knn["k"].unique().to_list())
    return 20 if 20 in ks else ks[0]


def knn_layers_figure(knn: pl.DataFrame) -> Figure:
    """kNN top-1 per layer: one line for the pretrained model and one per checkpoint epoch
    (the checkpoints themselves, alpha 1)."""
    k = _first_k(knn)
    rows = knn.filter(pl.col("k") == k)
    pretrained = rows.filter(pl.col("model") == "pt").sort("layer")
    tuned = rows.filter((pl.col("model") == "ft") & (pl.col("alpha") == 1.0))
    epochs = sorted(tuned["epoch"].unique().to_list())
    colors, cmap, norm = _discrete_colors(epochs or [0], "viridis")
    figure = new_figure(figsize=(8, 4.5))
    axis = figure.subplots()
    for epoch in epochs:
        line = tuned.filter(pl.col("epoch") == epoch).sort("layer")
        axis.plot(line["layer"].to_numpy(), line["top1"].to_numpy(), marker="o", ms=3, color=colors[epoch], lw=1.3)
    if len(pretrained):
        axis.plot(pretrained["layer"].to_numpy(), pretrained["top1"].to_numpy(), color="black", ls="--", marker="s", ms=4, lw=1.6)
    axis.set_xticks(sorted(rows["layer"].unique().to_list()))
    axis.set_xlabel("layer (last = pre-logits)")
    axis.set_ylabel(f"kNN top-1 accuracy (k = {k})")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title("weighted kNN (DINO) on frozen features, per layer", fontsize=10)
    axis.grid(alpha=0.3)
    pretrained_handle = matplotlib.lines.Line2D([], [], color="black", ls="--", marker="s", ms=4, label="pretrained")
    _discrete_key(figure, axis, epochs, colors, cmap, norm, "epoch", extra=[pretrained_handle], title="model")
    return figure


def knn_alpha_figure(knn: pl.DataFrame) -> Figure:
    """kNN top-1 against alpha, one line per layer, a panel per checkpoint with a weight path."""
    k = _first_k(knn)
    rows = knn.filter((pl.col("k") == k) & (pl.col("model") == "ft"))
    path_epochs = sorted(rows.filter(pl.col("alpha") != 1.0)["epoch"].unique().to_list())
    layers = sorted(rows["layer"].unique().to_list())
    colors, cmap, norm = _discrete_colors(layers, "turbo")
    figure = new_figure(figsize=(6 * max(1, len(path_epochs)), 4.2))
    axes = np.atleast_1d(figure.subplots(1, max(1, len(path_epochs))))
    for axis, epoch in zip(axes, path_epochs):
        path = rows.filter(pl.col("epoch") == epoch)
        for layer in layers:
            line = path.filter(pl.col("layer") == layer).sort("alpha")
            axis.plot(line["alpha"].to_numpy(), line["top1"].to_numpy(), marker="o", ms=3, color=colors[layer], lw=1.3)
        axis.set_xlabel(ALPHA_LABEL)
        axis.set_ylabel(f"kNN top-1 accuracy (k = {k})")
        axis.set_xlim(-0.02, 1.02)
        axis.set_ylim(-0.02, 1.02)
        checkpoint = path["checkpoint"][0] if len(path) else ""
        axis.set_title(f"weight path to {checkpoint_title(checkpoint, epoch)}", fontsize=10)
        axis.grid(alpha=0.3)
    _discrete_key(figure, axes, layers, colors, cmap, norm, "layer")
    return figure


def interpolation_png(curves: pl.DataFrame, epoch: int) -> bytes:
    return png_bytes(interpolation_figure(curves, epoch))


def knn_layers_png(knn: pl.DataFrame) -> bytes:
    return png_bytes(knn_layers_figure(knn))


def knn_alpha_png(knn: pl.DataFrame) -> bytes:
    return png_bytes(knn_alpha_figure(knn))


# ---------------------------------------------------------------------------------------------
# a study: many finetuning runs of one config (``{run}`` in ``checkpoints``)


def runs_compared_figure(table: pl.DataFrame, spread_layers: tuple[int, int]) -> Figure:
    """The paper's Fig. 6 view of a study: mean corrupted accuracy (left, where runs have finetuning
    metrics) and the standard deviation of forgetting across layers ``spread_layers`` (right) over
    the checkpoint epochs, one line (colour) per run.

    ``table``: run, epoch, forgetting_std_across_layers, corrupted_accuracy_mean (null without metrics)."""
    runs = list(dict.fromkeys(table.sort("run")["run"].to_list()))
    with_accuracy = table["corrupted_accuracy_mean"].is_not_null().any()
    figure = new_figure(figsize=(13 if with_accuracy else 7, 4.4))
    axes = list(np.atleast_1d(figure.subplots(1, 2 if with_accuracy else 1)))
    accuracy_axis, spread_axis = (axes[0], axes[1]) if with_accuracy else (None, axes[0])
    for index, run in enumerate(runs):
        rows = table.filter(pl.col("run") == run).sort("epoch")
        color = f"C{index % 10}"
        style = "-" if index < 10 else "--"  # 20 runs stay apart
        spread_axis.plot(rows["epoch"].to_numpy(), rows["forgetting_std_across_layers"].to_numpy(), marker="o", ms=3,
                         ls=style, color=color, label=run)  # fmt: skip
        if accuracy_axis is not None:
            measured = rows.filter(pl.col("corrupted_accuracy_mean").is_not_null())
            accuracy_axis.plot(measured["epoch"].to_numpy(), measured["corrupted_accuracy_mean"].to_numpy(), marker="s",
                               ms=3, ls=style, color=color, label=run)  # fmt: skip
    first, last = spread_layers
    spread_axis.set_ylabel(f"std of forgetting across layers {first}..{last}")
    spread_axis.set_title("spread of forgetting across layers", fontsize=10)
    if accuracy_axis is not None:
        accuracy_axis.set_ylabel("mean corrupted accuracy")
        accuracy_axis.set_title("robustness: accuracy on corrupted test images", fontsize=10)
    for axis in axes:
        axis.set_xlabel("checkpoint epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    handles, labels = spread_axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=8, title="run")
    if not with_accuracy:
        figure.suptitle("no run has finetuning metrics (metrics/ beside its checkpoints): forgetting spread only",
                        fontsize=9, color="dimgrey")  # fmt: skip
    return figure


def runs_compared_png(table: pl.DataFrame, spread_layers: tuple[int, int]) -> bytes:
    return png_bytes(runs_compared_figure(table, spread_layers))
