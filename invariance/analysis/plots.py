"""Plots of the reduced tables, rendered to PNG bytes.

matplotlib's object API only (``matplotlib.figure.Figure`` with its own Agg canvas): nothing
here touches pyplot or switches the backend of a notebook that imports the library.

What every figure shows of its uncertainty (issue 27): a band is the 95% interval over seeds the
curves table holds (``<metric>_ci_low`` / ``_ci_high``, Student t; see analysis/metrics.py), named
in the legend with the number of seeds; a point whose ``<metric>_above_noise`` is false is drawn
with a hollow marker; a quantity from one seed has no band and says so ("1 seed: no interval");
lines that coincide are named in a note, since one hides the other.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from typing import Any, Sequence

import matplotlib
import matplotlib.cm
import matplotlib.colors
import matplotlib.gridspec
import matplotlib.lines
import matplotlib.patches
import matplotlib.ticker
import matplotlib.transforms
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


# the legend's name of the shaded band when the number of seeds is not known
BAND_LABEL = "shaded: 95% interval over seeds (t)"
NOISE_LABEL = "hollow marker: not above the noise floor"
ONE_SEED_LABEL = "1 seed: no interval"
CKA_NOTE = "CKA: one value per checkpoint (no seeds, no interval)"
ALPHA_LABEL = "alpha  ((1 - alpha) pretrained + alpha finetuned)"
PRE_LOGITS = "pre-logits"
# marker shapes of the lines of one panel: lines that coincide stay visible as distinct shapes
MARKERS = "os^vD<>pX*h"
# up to this many epochs (or layers) get a legend entry each; more get a discrete colour bar
LEGEND_LIMIT = 12
# lines closer than this fraction of a panel's y range everywhere are "on top of each other"
COINCIDE_FRACTION = 1e-3


def seed_counts(frame: pl.DataFrame) -> list[int]:
    """The distinct ``n_seeds`` of the rows (empty when the table has no such column)."""
    if "n_seeds" not in frame.columns:
        return []
    return sorted(int(n) for n in frame["n_seeds"].drop_nulls().unique().to_list())


def band_label(n_seeds: Sequence[int]) -> str:
    """The legend's name of the band: ``shaded: 95% interval over 3 seeds (t)`` (``2-3 seeds``
    where rows differ); BAND_LABEL when the counts are unknown."""
    counts = sorted({n for n in n_seeds if n >= 2})
    if not counts:
        return BAND_LABEL
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"shaded: 95% interval over {seeds} seeds (t)"


def is_pre_logits(layer: int, layer_names: Sequence[str] | None = None, depth: int | None = None) -> bool:
    """Whether ``layer`` is the pre-logits: its name in ``layer_names`` (a plan's, indexed by layer)
    says so, or, without names, its index equals ``depth`` (timm models: layers 0..depth)."""
    if layer_names:
        return 0 <= layer < len(layer_names) and layer_names[layer] == PRE_LOGITS
    return depth is not None and layer == depth


def layer_label(layer: int, layer_names: Sequence[str] | None = None, depth: int | None = None) -> str:
    """``"pre-logits"`` for the pre-logits layer, else the layer's number."""
    return PRE_LOGITS if is_pre_logits(layer, layer_names, depth) else str(layer)


def _set_layer_ticks(axis: Any, layers: Sequence[int], layer_names: Sequence[str] | None, depth: int | None,
                     which: str = "x") -> None:  # fmt: skip
    """One tick per layer; the pre-logits named (its label tilted on x, so it does not run into its neighbour)."""
    layers = sorted(layers)
    labels = [layer_label(k, layer_names, depth) for k in layers]
    (axis.set_xticks if which == "x" else axis.set_yticks)(layers if which == "x" else range(len(layers)), labels)
    if which == "x":
        for text in axis.get_xticklabels():
            if text.get_text() == PRE_LOGITS:
                text.set(rotation=-30, ha="left", rotation_mode="anchor", fontsize=8)


def _layer_name(layer: int, layer_names: Sequence[str] | None, depth: int | None) -> str:
    """A legend's name of a layer: ``layer 3``, ``layer 12 (pre-logits)``."""
    return f"layer {layer} ({PRE_LOGITS})" if is_pre_logits(layer, layer_names, depth) else f"layer {layer}"


def _discrete_colors(values: list[int], colormap: str) -> tuple[dict[int, tuple], matplotlib.colors.Colormap,
                                                                matplotlib.colors.BoundaryNorm]:  # fmt: skip
    """One colour per integer value (epochs, layers), and the discrete norm of their colour bar."""
    cmap = matplotlib.colormaps[colormap].resampled(max(2, len(values)))
    bounds = np.arange(len(values) + 1) - 0.5
    norm = matplotlib.colors.BoundaryNorm(bounds, cmap.N)
    return {value: cmap(norm(position)) for position, value in enumerate(values)}, cmap, norm


def _discrete_key(figure: Figure, axes: Any, values: list[int], colors: dict[int, tuple], cmap: Any, norm: Any,
                  name: str, band: bool | str = False, markers: str = MARKERS, extra: Sequence[Any] = (),
                  title: str | None = None, names: dict[int, str] | None = None,
                  notes: Sequence[Any] = ()) -> None:  # fmt: skip
    """A legend entry per value (``markers[i]`` for the i-th) when few, else a colour bar with one
    tick per value; ``band``: the shaded band is named (a string: that name); ``extra``: legend
    handles before the values, ``notes`` after them, shown either way; ``names``: a value's label."""
    band_name = band if isinstance(band, str) else BAND_LABEL
    handles = list(extra)
    if len(values) <= LEGEND_LIMIT:
        handles += [matplotlib.lines.Line2D([], [], color=colors[v], marker=markers[i % len(markers)], ms=4,
                                            label=(names or {}).get(v, f"{name} {v}")) for i, v in enumerate(values)]  # fmt: skip
        if band:
            handles.append(matplotlib.patches.Patch(color="grey", alpha=0.25, label=band_name))
    else:
        colorbar = figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9)
        colorbar.set_ticks(np.arange(len(values)), labels=[(names or {}).get(v, str(v)) for v in values])
        colorbar.set_label(f"{name} ({band_name})" if band else name)
    handles += list(notes)
    if handles:
        figure.legend(handles=handles, loc="outside right center", fontsize=8, title=title or name)


def _note(label: str, marker: str = "", **style: Any) -> matplotlib.lines.Line2D:
    """A legend entry that is a sentence (with a sample marker where it names one)."""
    return matplotlib.lines.Line2D([], [], ls="none", marker=marker or None, label=label, **{"color": "grey", **style})


def _uncertainty_notes(frame: pl.DataFrame, metrics: Sequence[str], band: bool = True) -> list[Any]:
    """Legend entries saying what the markers and the band mean for ``frame``: hollow markers (when
    a point is not above the noise floor) and, for one seed, that there is no interval."""
    notes = []
    if any(f"{m}_above_noise" in frame.columns and (frame[f"{m}_above_noise"] == False).any() for m in metrics):  # noqa: E712
        notes.append(_note(NOISE_LABEL, marker="o", mfc="white", mec="grey", ms=5))
    if band and seed_counts(frame) and min(seed_counts(frame)) < 2:
        notes.append(_note(ONE_SEED_LABEL + (" (some rows)" if max(seed_counts(frame)) >= 2 else "")))
    return notes


def _band_name(frame: pl.DataFrame, metrics: Sequence[str] = ("forgetting", "learning")) -> str | bool:
    """The band's legend name for ``frame``, or False where nothing is shaded (no interval
    columns, or one seed everywhere)."""
    if not any(f"{m}_ci_low" in frame.columns for m in metrics):
        return False
    counts = seed_counts(frame)
    if counts and max(counts) < 2:
        return False
    return band_label(counts)


def _column(rows: pl.DataFrame, name: str) -> np.ndarray | None:
    return rows[name].cast(pl.Float64).to_numpy() if name in rows.columns else None


def draw_series(axis: Any, rows: pl.DataFrame, x: str, metric: str, color: Any, marker: str = "o", band: bool = True,
                label: str = "", ms: float = 4, lw: float = 1.4) -> None:  # fmt: skip
    """One line of ``{metric}_mean`` against ``x`` with its 95% interval (``_ci_low``/``_ci_high``)
    shaded where the table has one (not for one seed), and hollow markers where
    ``{metric}_above_noise`` is false. The band's collection is labelled ``_band {label}`` (hidden
    from legends, found by tests)."""
    xs, mean = rows[x].cast(pl.Float64).to_numpy(), rows[f"{metric}_mean"].cast(pl.Float64).to_numpy()
    axis.plot(xs, mean, color=color, lw=lw, label=f"_line {label}")
    above = rows[f"{metric}_above_noise"].to_list() if f"{metric}_above_noise" in rows.columns else [None] * len(xs)
    hollow = np.array([value is False for value in above], dtype=bool)
    if (~hollow).any():
        axis.plot(xs[~hollow], mean[~hollow], ls="none", marker=marker, ms=ms, color=color, label=f"_points {label}")
    if hollow.any():
        axis.plot(xs[hollow], mean[hollow], ls="none", marker=marker, ms=ms + 1, mfc="white", mec=color, mew=1.2,
                  label=f"_below noise {label}")  # fmt: skip
    low, high = _column(rows, f"{metric}_ci_low"), _column(rows, f"{metric}_ci_high")
    if band and low is not None and high is not None:
        defined = np.isfinite(low) & np.isfinite(high)
        if defined.any() and np.any(high[defined] > low[defined]):  # CKA: zero width, nothing to shade
            axis.fill_between(xs, low, high, where=defined, color=color, alpha=0.12, lw=0, label=f"_band {label}",
                              interpolate=False)  # fmt: skip


def _coinciding(lines: dict[str, tuple[np.ndarray, np.ndarray]], tolerance: float) -> list[list[str]]:
    """Groups of line names whose points are the same (x equal, y within ``tolerance``)."""
    groups: list[list[str]] = []
    representatives: list[tuple[np.ndarray, np.ndarray]] = []
    for name, (x, y) in lines.items():
        for group, (gx, gy) in zip(groups, representatives):
            if len(x) > 1 and len(gx) == len(x) and np.array_equal(gx, x) and np.allclose(gy, y, rtol=0, atol=tolerance, equal_nan=True):
                group.append(name)
                break
        else:
            groups.append([name])
            representatives.append((x, y))
    return [group for group in groups if len(group) > 1]


# a coinciding group of more names than this is shortened ("epoch 2 = 10 others (epochs 3, 5-10, 12-14)")
NOTE_NAMES = 3
# a note shows this many groups at most (one line each), each wrapped at NOTE_WIDTH characters: a note
# as wide as its panel made the constrained layout collapse every panel to a sliver
NOTE_GROUPS = 3
NOTE_WIDTH = 72
_NUMBERED = re.compile(r"^(?P<prefix>\D*?)\s*(?P<number>-?\d+)$")


def _ranges(numbers: list[int]) -> str:
    """``[3, 5, 6, 7, 9]`` as ``"3, 5-7, 9"``."""
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def coinciding_text(group: Sequence[str]) -> str:
    """One group of coinciding lines in a few words, whatever its size: ``"epoch 2 = epoch 5"`` up to
    NOTE_NAMES names, else the first and a count (``"epoch 2 = 10 others (epochs 3, 5-10, 12-14)"``,
    or ``"epochs 3 to 500"`` where the ranges are long)."""
    if len(group) <= NOTE_NAMES:
        return " = ".join(group)
    first, others = group[0], list(group[1:])
    matches = [_NUMBERED.match(name) for name in others]
    prefixes = {m.group("prefix") for m in matches if m}
    if all(matches) and len(prefixes) == 1:
        prefix = prefixes.pop()
        numbers = [int(m.group("number")) for m in matches]  # type: ignore[union-attr]
        plural = f"{prefix}s " if prefix else ""
        ranges = _ranges(numbers)
        which = plural + (ranges if len(ranges) <= 24 else f"{min(numbers)} to {max(numbers)}")
    else:
        which = f"{others[0]} ... {others[-1]}"
    return f"{first} = {len(others)} others ({which})"


def note_coinciding(axis: Any, lines: dict[str, tuple[np.ndarray, np.ndarray]], height: float = 0.01) -> list[list[str]]:
    """Names lines drawn on top of each other in a note at the panel's bottom ("on top of each
    other: epoch 1 = epoch 2"; ``height``: its place in axes coordinates); returns the groups. The
    note stays short however many lines coincide (a group of many is counted, at most NOTE_GROUPS
    groups are named), so it never widens the panel's layout."""
    values = np.concatenate([y for _, y in lines.values()]) if lines else np.array([])
    finite = values[np.isfinite(values)]
    span = float(np.ptp(finite)) if len(finite) else 0.0
    groups = _coinciding(lines, COINCIDE_FRACTION * span if span > 0 else 1e-12)
    if groups:
        parts = [coinciding_text(group) for group in groups[:NOTE_GROUPS]]
        if len(groups) > NOTE_GROUPS:
            parts.append(f"and {len(groups) - NOTE_GROUPS} more groups")
        text = textwrap.fill("on top of each other: " + "; ".join(parts), NOTE_WIDTH)
        axis.text(0.01, height, text, transform=axis.transAxes, fontsize=7, color="dimgrey", va="bottom", ha="left")
    return groups


def _cka_has_interval(frame: pl.DataFrame | None) -> bool:
    """Whether the table's CKA divergence has an interval of non-zero width (CKA rows without seeds do not)."""
    if frame is None or "cka_divergence_ci_low" not in frame.columns or frame.is_empty():
        return False
    width = (frame["cka_divergence_ci_high"] - frame["cka_divergence_ci_low"]).cast(pl.Float64).fill_null(0.0)
    return bool((width.abs() > 0).any())


def _metric_axes(figure: Figure, xlabel: str, frame: pl.DataFrame | None = None) -> list[tuple[Any, str]]:
    """The three panels of forgetting, learning and CKA divergence, labelled, with the zero line:
    [(axis, metric)]; the CKA panel says it has no interval where ``frame``'s has none."""
    panels = []
    cka_note = not _cka_has_interval(frame)
    for axis, (metric, label) in zip(figure.subplots(1, 3), CURVE_METRICS):
        noted = metric == "cka_divergence" and cka_note
        axis.axhline(0.0, color="grey", lw=0.6)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(metric.replace("_", " ") + ("" if noted else " (mean over seeds)"))
        axis.set_title(label + (f"\n{CKA_NOTE}" if noted else ""), fontsize=9 if noted else 10)
        axis.grid(alpha=0.3)
        panels.append((axis, metric))
    return panels


# the epochs a layer-curves figure draws at most, evenly spaced
CURVE_EPOCHS = 12


def evenly_spaced(values: list[int], limit: int) -> list[int]:
    """At most ``limit`` of ``values`` (sorted), evenly spaced, always the first and the last."""
    if len(values) <= limit:
        return list(values)
    positions = sorted({round(k * (len(values) - 1) / (limit - 1)) for k in range(limit)})
    return [values[p] for p in positions]


def layer_curves_figure(curves: pl.DataFrame, title: str = "", *, layer_names: Sequence[str] | None = None,
                        depth: int | None = None) -> Figure:  # fmt: skip
    """Per-layer curves, one line (colour and marker) per checkpoint epoch: the mean over seeds, its
    95% interval over seeds shaded, hollow markers where not above the noise floor. ``layer_names``
    (a plan's, by layer index) or ``depth`` name the pre-logits layer. With more than
    CURVE_EPOCHS epochs, that many evenly spaced ones are drawn (always the first and the last: 500
    lines are unreadable and took 90 s to draw), and the title says so."""
    every = sorted(curves["epoch"].unique().to_list())
    epochs = evenly_spaced(every, CURVE_EPOCHS)
    if len(epochs) < len(every):
        curves = curves.filter(pl.col("epoch").is_in(epochs))
        title = f"{title + ': ' if title else ''}{len(epochs)} of {len(every)} epochs drawn (all in reduced/curves.parquet)"
    colors, cmap, norm = _discrete_colors(epochs, "viridis")
    layers = sorted(curves["layer"].unique().to_list())
    figure = new_figure(figsize=(16, 4.4))
    panels = _metric_axes(figure, "layer", curves)
    for axis, metric in panels:
        drawn = {}
        for position, epoch in enumerate(epochs):
            rows = curves.filter(pl.col("epoch") == epoch).sort("layer")
            draw_series(axis, rows, "layer", metric, colors[epoch], MARKERS[position % len(MARKERS)], label=f"epoch {epoch}",
                        ms=3.5)  # fmt: skip
            drawn[f"epoch {epoch}"] = (rows["layer"].to_numpy(), rows[f"{metric}_mean"].cast(pl.Float64).to_numpy())
        note_coinciding(axis, drawn)
        _set_layer_ticks(axis, layers, layer_names, depth)
    axes = [axis for axis, _ in panels]
    _discrete_key(figure, axes, epochs, colors, cmap, norm, "epoch", band=_band_name(curves),
                  notes=_uncertainty_notes(curves, ("forgetting", "learning")))  # fmt: skip
    if title:
        figure.suptitle(title)
    return figure


def dynamics_figure(curves: pl.DataFrame, title: str = "", *, layer_names: Sequence[str] | None = None,
                    depth: int | None = None, run_metrics: pl.DataFrame | None = None) -> Figure:  # fmt: skip
    """Each metric across checkpoint epochs, one line (colour and marker) per layer, with its 95%
    interval over seeds shaded; every panel on a linear axis (a symmetric-log one put 0 and 1e-3
    side by side as if neighbours). ``run_metrics`` (the finetuning run's metrics per epoch, as
    ``io.run_metrics`` reads them): a fourth panel with the clean and the corrupted test accuracy
    per epoch, and the linear-probing epochs (``stage`` lp: only the head trains) shaded on every
    panel, the stage named at the top."""
    layers = sorted(curves["layer"].unique().to_list())
    colors, cmap, norm = _discrete_colors(layers, "turbo")
    accuracy = _accuracy_columns(run_metrics)
    figure = new_figure(figsize=(21 if accuracy else 16, 4.4))
    panels = _metric_axes(figure, "checkpoint epoch", curves)
    axes = [axis for axis, _ in panels]
    if accuracy:  # the metric panels take three of four columns; accuracy the fourth
        grid = matplotlib.gridspec.GridSpec(1, 4, figure=figure)
        for position, axis in enumerate(axes):
            axis.set_subplotspec(grid[0, position])
        axes.append(figure.add_subplot(grid[0, 3]))
        _draw_accuracy(axes[-1], run_metrics, accuracy)
    names = {layer: _layer_name(layer, layer_names, depth) for layer in layers}
    for axis, metric in panels:
        drawn = {}
        for position, layer in enumerate(layers):
            rows = curves.filter(pl.col("layer") == layer).sort("epoch")
            draw_series(axis, rows, "epoch", metric, colors[layer], MARKERS[position % len(MARKERS)], label=names[layer])
            drawn[names[layer]] = (rows["epoch"].to_numpy(), rows[f"{metric}_mean"].cast(pl.Float64).to_numpy())
        note_coinciding(axis, drawn)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    notes = _uncertainty_notes(curves, ("forgetting", "learning"))
    if _mark_stages(axes, run_metrics):
        notes.append(matplotlib.patches.Patch(color=STAGE_COLOR, label=STAGE_LABEL))
    _discrete_key(figure, axes, layers, colors, cmap, norm, "layer", band=_band_name(curves), names=names, notes=notes)
    if title:
        figure.suptitle(title)
    return figure


# the linear-probing stage (lp_ft's first epochs, linear_probe): shaded on the dynamics' panels
STAGE_COLOR = "#d8d8d8"
STAGE_LABEL = "grey span: LP stage (only the head trains)"
ACCURACY_LINES = (("clean_accuracy", "clean", "-"), ("corrupted_accuracy", "corrupted (mean)", "--"))


def _accuracy_columns(run_metrics: pl.DataFrame | None) -> list[str]:
    """The accuracy columns of ``run_metrics`` with a value (none: no accuracy panel)."""
    if run_metrics is None or run_metrics.is_empty() or "epoch" not in run_metrics.columns:
        return []
    return [c for c, _, _ in ACCURACY_LINES if c in run_metrics.columns and run_metrics[c].drop_nulls().len() > 0]


def _draw_accuracy(axis: Any, run_metrics: pl.DataFrame, columns: list[str]) -> None:
    """Clean and corrupted test accuracy per finetuning epoch (the run's own metrics, one value each)."""
    rows = run_metrics.sort("epoch")
    for column, label, style in ACCURACY_LINES:
        if column in columns:
            kept = rows.filter(pl.col(column).is_not_null())
            axis.plot(kept["epoch"].to_numpy(), kept[column].cast(pl.Float64).to_numpy(), color="black", ls=style,
                      marker="o" if style == "-" else "s", ms=3.5, label=label)  # fmt: skip
    axis.set_xlabel("finetuning epoch")
    axis.set_ylabel("test accuracy")
    axis.set_title("accuracy of the finetuned model\n(its run's metrics; one value per epoch)", fontsize=9)
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")


def _mark_stages(axes: list[Any], run_metrics: pl.DataFrame | None) -> bool:
    """Shade the epochs of the LP stage on every panel and name both stages at the top of the
    first; True when there is an LP stage to mark."""
    if run_metrics is None or "stage" not in run_metrics.columns or "epoch" not in run_metrics.columns:
        return False
    stages = run_metrics.filter(pl.col("stage").is_not_null()).sort("epoch")
    lp = stages.filter(pl.col("stage") == "lp")["epoch"].to_list()
    if not lp:
        return False
    low, high = min(lp) - 0.5, max(lp) + 0.5
    ft = stages.filter(pl.col("stage") == "ft")["epoch"].to_list()
    for axis in axes:
        axis.axvspan(low, high, color=STAGE_COLOR, alpha=0.6, lw=0, zorder=0, label="_stage lp")
    first = axes[0]
    transform = matplotlib.transforms.blended_transform_factory(first.transData, first.transAxes)
    first.text((low + high) / 2, 0.98, "LP", transform=transform, ha="center", va="top", fontsize=8, color="dimgrey")
    if ft:
        first.text((min(ft) + max(ft)) / 2, 0.98, "FT", transform=transform, ha="center", va="top", fontsize=8,
                   color="dimgrey")  # fmt: skip
    return True


def flow_color_limit(flow: pl.DataFrame) -> float:
    """The colour range of every flow heatmap of a table: ±max |flow| over all its epochs, so that
    heatmaps of different epochs compare, rounded up to 1, 2 or 5 x 10^k: a new epoch changes it
    (and redraws the run's older heatmaps) only when it crosses such a step, not at every rerun."""
    values = flow["flow"].cast(pl.Float64).to_numpy() if len(flow) else np.array([])
    finite = np.abs(values[np.isfinite(values)])
    if not len(finite) or finite.max() <= 0:
        return 1.0
    largest = float(finite.max())
    scale = 10.0 ** math.floor(math.log10(largest))
    return next(step * scale for step in (1.0, 2.0, 5.0, 10.0) if step * scale >= largest * (1 - 1e-12))


def checkpoint_title(checkpoint: str, epoch: int) -> str:
    """``epoch 3``, with the checkpoint's name only where it says more than the epoch."""
    plain = {f"epoch={epoch}", f"epoch={epoch:02d}", f"epoch={epoch:03d}"}
    return f"epoch {epoch}" if not checkpoint or checkpoint in plain else f"epoch {epoch} ({checkpoint})"


def _flow_interval_note(rows: pl.DataFrame) -> str:
    """What the flow heatmap says of its uncertainty: dotted cells, or one seed."""
    counts = seed_counts(rows)
    if "flow_ci_low" not in rows.columns or not counts:
        return ""
    if max(counts) < 2:
        return f"; {ONE_SEED_LABEL}"
    return f"; dot: its 95% interval over {band_label(counts).split(' over ')[1].split(' (')[0]} includes 0"


def flow_figure(flow: pl.DataFrame, epoch: int, *, layer_names: Sequence[str] | None = None,
                depth: int | None = None) -> Figure:  # fmt: skip
    """Invariance flow matrix of one checkpoint (rows pt layer i, columns ft layer j), on the colour
    range shared by every epoch of ``flow``; the diagonal (0 by definition) is outlined, and a dot
    marks a cell whose 95% interval over seeds (``flow_ci_low``/``_high``) includes 0."""
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
    note = _flow_interval_note(rows)
    if note.startswith("; dot"):
        spans_zero = rows.filter((pl.col("pt_layer") != pl.col("ft_layer")) & (pl.col("flow_ci_low") <= 0)
                                 & (pl.col("flow_ci_high") >= 0))  # fmt: skip
        if len(spans_zero):
            axis.plot([ft_layers.index(j) for j in spans_zero["ft_layer"]], [pt_layers.index(i) for i in spans_zero["pt_layer"]],
                      ls="none", marker="o", ms=2.5, color="dimgrey", label="_interval includes 0")  # fmt: skip
    axis.set_xticks(range(len(ft_layers)), [layer_label(k, layer_names, depth) for k in ft_layers])
    axis.set_yticks(range(len(pt_layers)), [layer_label(k, layer_names, depth) for k in pt_layers])
    for text in axis.get_xticklabels():
        if text.get_text() == PRE_LOGITS:
            text.set(rotation=-30, ha="left", rotation_mode="anchor", fontsize=8)
    axis.set_xlabel("finetuned layer j")
    axis.set_ylabel("pretrained layer i")
    checkpoint = rows["checkpoint"][0] if len(rows) else ""
    axis.set_title(f"invariance flow  STIR(ft[j]|pt[i]) - STIR(ft[i]|pt[i]),  {checkpoint_title(checkpoint, epoch)}\n"
                   f"left of the outlined diagonal > 0: compression; right: expansion{note}", fontsize=9)  # fmt: skip
    figure.colorbar(image, ax=axis, label="flow (mean over seeds; one range for every epoch)")
    return figure


def layer_curves_png(curves: pl.DataFrame, title: str = "", **names: Any) -> bytes:
    return png_bytes(layer_curves_figure(curves, title, **names))


def dynamics_png(curves: pl.DataFrame, title: str = "", *, run_metrics: pl.DataFrame | None = None, **names: Any) -> bytes:
    """``dynamics_figure`` as PNG (``run_metrics``: with the accuracy panel and the stages marked)."""
    return png_bytes(dynamics_figure(curves, title, run_metrics=run_metrics, **names))


def flow_heatmap_png(flow: pl.DataFrame, epoch: int, **names: Any) -> bytes:
    return png_bytes(flow_figure(flow, epoch, **names))


# ---------------------------------------------------------------------------------------------
# weight paths (interpolation.alphas) and kNN probes

PRETRAINED_POINT = "alpha 0: the pretrained model"


def with_pretrained_point(rows: pl.DataFrame, metrics: Sequence[str] = tuple(m for m, _ in CURVE_METRICS)) -> pl.DataFrame:
    """``rows`` (one checkpoint's weight path) with alpha 0 added per layer where it was not
    computed: there ft is pt, so forgetting, learning and CKA divergence are 0 by definition (a
    zero-width interval, and no noise-floor verdict)."""
    if rows.is_empty() or (rows["alpha"] == 0.0).any():
        return rows
    zero = rows.group_by("layer").agg(pl.all().first()).with_columns(
        pl.lit(0.0).alias("alpha"),
        *(pl.lit(0.0).alias(f"{m}_{stat}") for m in metrics for stat in ("mean", "std", "ci_low", "ci_high")
          if f"{m}_{stat}" in rows.columns),
        *(pl.lit(None, dtype=pl.Boolean).alias(f"{m}_above_noise") for m in metrics if f"{m}_above_noise" in rows.columns),
    )  # fmt: skip
    return pl.concat([zero.select(rows.columns), rows], how="vertical_relaxed").sort("layer", "alpha")


def interpolation_figure(curves: pl.DataFrame, epoch: int, *, layer_names: Sequence[str] | None = None,
                         depth: int | None = None) -> Figure:  # fmt: skip
    """Forgetting, learning and CKA divergence against alpha for the checkpoint of ``epoch``, one
    line per layer with its 95% interval over seeds shaded, from alpha 0 (the pretrained weights:
    0 by definition where not computed, drawn as a black star) to 1 (the checkpoint)."""
    computed = curves.filter(pl.col("epoch") == epoch)
    has_zero = bool(len(computed)) and bool((computed["alpha"] == 0.0).any())
    rows = with_pretrained_point(computed)
    layers = sorted(rows["layer"].unique().to_list())
    colors, cmap, norm = _discrete_colors(layers, "turbo")
    names = {layer: _layer_name(layer, layer_names, depth) for layer in layers}
    figure = new_figure(figsize=(16, 4.4))
    panels = _metric_axes(figure, ALPHA_LABEL, computed)
    for axis, metric in panels:
        drawn = {}
        for position, layer in enumerate(layers):
            line = rows.filter(pl.col("layer") == layer).sort("alpha")
            draw_series(axis, line, "alpha", metric, colors[layer], MARKERS[position % len(MARKERS)], label=names[layer], ms=3.5)
            drawn[names[layer]] = (line["alpha"].to_numpy(), line[f"{metric}_mean"].cast(pl.Float64).to_numpy())
        if not has_zero and len(rows):
            axis.plot([0.0], [0.0], ls="none", marker="*", ms=11, color="black", zorder=5, label="_pretrained")
        note_coinciding(axis, drawn)
        axis.set_xlim(-0.04, 1.04)
    pretrained = [_note(f"{PRETRAINED_POINT} (0 by definition)", marker="*", color="black", ms=9)] if not has_zero else []
    _discrete_key(figure, [axis for axis, _ in panels], layers, colors, cmap, norm, "layer", band=_band_name(computed),
                  names=names, extra=pretrained, notes=_uncertainty_notes(computed, ("forgetting", "learning")))  # fmt: skip
    checkpoint = computed["checkpoint"][0] if len(computed) else ""
    figure.suptitle(f"along the weight path from the pretrained model (alpha 0) to {checkpoint_title(checkpoint, epoch)}")
    return figure


def _first_k(knn: pl.DataFrame) -> int:
    """The k the kNN plots show: 20 (DINO's usual best) when asked, else the smallest."""
    ks = sorted(knn["k"].unique().to_list())
    return 20 if 20 in ks else ks[0]


def _knn_note(rows: pl.DataFrame) -> str:
    """kNN accuracy has no seeds: one evaluation on ``n_test`` images, no interval."""
    n_test = sorted(rows["n_test"].drop_nulls().unique().to_list()) if "n_test" in rows.columns else []
    images = f" on {n_test[0]} test images" if len(n_test) == 1 else ""
    return f"one evaluation{images}: no interval"


def knn_layers_figure(knn: pl.DataFrame, *, layer_names: Sequence[str] | None = None, depth: int | None = None) -> Figure:
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
    drawn = {}
    for position, epoch in enumerate(epochs):
        line = tuned.filter(pl.col("epoch") == epoch).sort("layer")
        axis.plot(line["layer"].to_numpy(), line["top1"].to_numpy(), marker=MARKERS[position % len(MARKERS)], ms=3.5,
                  color=colors[epoch], lw=1.3)  # fmt: skip
        drawn[f"epoch {epoch}"] = (line["layer"].to_numpy(), line["top1"].cast(pl.Float64).to_numpy())
    if len(pretrained):
        axis.plot(pretrained["layer"].to_numpy(), pretrained["top1"].to_numpy(), color="black", ls="--", marker="s", ms=4, lw=1.6)
        drawn["pretrained"] = (pretrained["layer"].to_numpy(), pretrained["top1"].cast(pl.Float64).to_numpy())
    note_coinciding(axis, drawn)
    _set_layer_ticks(axis, rows["layer"].unique().to_list(), layer_names, depth)
    axis.set_xlabel("layer")
    axis.set_ylabel(f"kNN top-1 accuracy (k = {k})")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(f"weighted kNN (DINO) on frozen features, per layer\n{_knn_note(rows)}", fontsize=10)
    axis.grid(alpha=0.3)
    pretrained_handle = matplotlib.lines.Line2D([], [], color="black", ls="--", marker="s", ms=4, label="pretrained")
    _discrete_key(figure, axis, epochs, colors, cmap, norm, "epoch", extra=[pretrained_handle], title="model")
    return figure


def knn_alpha_figure(knn: pl.DataFrame, *, layer_names: Sequence[str] | None = None, depth: int | None = None) -> Figure:
    """kNN top-1 against alpha, one line per layer, a panel per checkpoint with a weight path; each
    line starts at alpha 0 with the pretrained model's accuracy (its ``model == "pt"`` rows) where
    alpha 0 was not computed on the path."""
    k = _first_k(knn)
    rows = knn.filter((pl.col("k") == k) & (pl.col("model") == "ft"))
    pretrained = knn.filter((pl.col("k") == k) & (pl.col("model") == "pt")).select("layer", "top1")
    path_epochs = sorted(rows.filter(pl.col("alpha") != 1.0)["epoch"].unique().to_list())
    layers = sorted(rows["layer"].unique().to_list())
    colors, cmap, norm = _discrete_colors(layers, "turbo")
    names = {layer: _layer_name(layer, layer_names, depth) for layer in layers}
    figure = new_figure(figsize=(6 * max(1, len(path_epochs)), 4.4))
    axes = np.atleast_1d(figure.subplots(1, max(1, len(path_epochs))))
    added_zero = False
    for axis, epoch in zip(axes, path_epochs):
        path = rows.filter(pl.col("epoch") == epoch)
        drawn = {}
        for position, layer in enumerate(layers):
            line = path.filter(pl.col("layer") == layer).sort("alpha")
            alphas, top1 = line["alpha"].cast(pl.Float64).to_numpy(), line["top1"].cast(pl.Float64).to_numpy()
            start = pretrained.filter(pl.col("layer") == layer)["top1"]
            if not (alphas == 0.0).any() and len(start):  # alpha 0 is the pretrained model itself
                alphas, top1 = np.concatenate([[0.0], alphas]), np.concatenate([[float(start[0])], top1])
                axis.plot([0.0], [float(start[0])], ls="none", marker="*", ms=10, color="black", mfc=colors[layer], zorder=5,
                          label="_pretrained")  # fmt: skip
                added_zero = True
            axis.plot(alphas, top1, marker=MARKERS[position % len(MARKERS)], ms=3.5, color=colors[layer], lw=1.3)
            drawn[names[layer]] = (alphas, top1)
        note_coinciding(axis, drawn)
        axis.set_xlabel(ALPHA_LABEL)
        axis.set_ylabel(f"kNN top-1 accuracy (k = {k})")
        axis.set_xlim(-0.04, 1.04)
        axis.set_ylim(-0.02, 1.02)
        checkpoint = path["checkpoint"][0] if len(path) else ""
        axis.set_title(f"weight path to {checkpoint_title(checkpoint, epoch)}\n{_knn_note(path)}", fontsize=10)
        axis.grid(alpha=0.3)
    extra = [_note(f"{PRETRAINED_POINT} (its kNN rows)", marker="*", color="black", ms=9)] if added_zero else []
    _discrete_key(figure, axes, layers, colors, cmap, norm, "layer", names=names, extra=extra)
    return figure


def interpolation_png(curves: pl.DataFrame, epoch: int, **names: Any) -> bytes:
    return png_bytes(interpolation_figure(curves, epoch, **names))


def knn_layers_png(knn: pl.DataFrame, **names: Any) -> bytes:
    return png_bytes(knn_layers_figure(knn, **names))


def knn_alpha_png(knn: pl.DataFrame, **names: Any) -> bytes:
    return png_bytes(knn_alpha_figure(knn, **names))


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
