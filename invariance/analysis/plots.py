"""Plots of the reduced tables, rendered to PNG bytes.

matplotlib's object API only (``matplotlib.figure.Figure`` with its own Agg canvas): nothing
here touches pyplot or switches the backend of a notebook that imports the library.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib
import matplotlib.cm
import matplotlib.colors
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


def _epoch_colors(epochs: list[int]) -> tuple[matplotlib.colors.Colormap, matplotlib.colors.Normalize]:
    norm = matplotlib.colors.Normalize(vmin=min(epochs), vmax=max(max(epochs), min(epochs) + 1))
    return matplotlib.colormaps["viridis"], norm


def layer_curves_png(curves: pl.DataFrame, title: str = "") -> bytes:
    """Per-layer curves, one line per checkpoint epoch (mean over seeds, band = +-1 std)."""
    epochs = sorted(curves["epoch"].unique().to_list())
    cmap, norm = _epoch_colors(epochs)
    figure = new_figure(figsize=(15, 4.2))
    axes = figure.subplots(1, 3)
    for axis, (metric, label) in zip(axes, CURVE_METRICS):
        for epoch in epochs:
            rows = curves.filter(pl.col("epoch") == epoch).sort("layer")
            layers = rows["layer"].to_numpy()
            mean = rows[f"{metric}_mean"].to_numpy()
            std = rows[f"{metric}_std"].fill_null(0.0).to_numpy()
            color = cmap(norm(epoch))
            axis.plot(layers, mean, marker="o", ms=3, color=color, lw=1.5)
            axis.fill_between(layers, mean - std, mean + std, color=color, alpha=0.12, lw=0)
        axis.axhline(0.0, color="grey", lw=0.6)
        axis.set_xticks(sorted(curves["layer"].unique().to_list()))
        axis.set_xlabel("layer (block index; last = pre-logits)")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    colorbar = figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9)
    colorbar.set_label("checkpoint epoch")
    if len(epochs) <= 12:
        colorbar.set_ticks(epochs)
    if title:
        figure.suptitle(title)
    return png_bytes(figure)


def dynamics_png(curves: pl.DataFrame, title: str = "") -> bytes:
    """Each metric across checkpoint epochs, one line per layer."""
    layers = sorted(curves["layer"].unique().to_list())
    norm = matplotlib.colors.Normalize(vmin=min(layers), vmax=max(max(layers), 1))
    cmap = matplotlib.colormaps["plasma"]
    figure = new_figure(figsize=(15, 4.2))
    axes = figure.subplots(1, 3)
    for axis, (metric, label) in zip(axes, CURVE_METRICS):
        for layer in layers:
            rows = curves.filter(pl.col("layer") == layer).sort("epoch")
            axis.plot(rows["epoch"].to_numpy(), rows[f"{metric}_mean"].to_numpy(), marker="o", ms=3,
                      color=cmap(norm(layer)), lw=1.3)  # fmt: skip
        axis.set_xlabel("checkpoint epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    colorbar = figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9)
    colorbar.set_label("layer")
    colorbar.set_ticks(layers)
    if title:
        figure.suptitle(title)
    return png_bytes(figure)


def flow_heatmap_png(flow: pl.DataFrame, epoch: int) -> bytes:
    """Invariance flow matrix of one checkpoint: rows pt layer i, columns ft layer j."""
    rows = flow.filter(pl.col("epoch") == epoch)
    pt_layers = sorted(rows["pt_layer"].unique().to_list())
    ft_layers = sorted(rows["ft_layer"].unique().to_list())
    matrix = np.full((len(pt_layers), len(ft_layers)), np.nan)
    for pt_layer, ft_layer, value in rows.select("pt_layer", "ft_layer", "flow").iter_rows():
        matrix[pt_layers.index(pt_layer), ft_layers.index(ft_layer)] = value
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    figure = new_figure(figsize=(6, 5))
    axis = figure.subplots()
    image = axis.imshow(matrix, cmap="RdBu_r", vmin=-limit or -1, vmax=limit or 1, origin="upper")
    axis.set_xticks(range(len(ft_layers)), ft_layers)
    axis.set_yticks(range(len(pt_layers)), pt_layers)
    axis.set_xlabel("finetuned layer j")
    axis.set_ylabel("pretrained layer i")
    checkpoint = rows["checkpoint"][0] if len(rows) else ""
    axis.set_title(f"invariance flow  STIR(ft[j]|pt[i]) - STIR(ft[i]|pt[i])\n{checkpoint} (epoch {epoch}); "
                   "left of diagonal > 0: compression", fontsize=9)  # fmt: skip
    figure.colorbar(image, ax=axis, label="flow")
    return png_bytes(figure)
