"""Plot properties checked on the figure objects: shared colour ranges, labels, discrete keys."""

from __future__ import annotations

import matplotlib
import numpy as np
import polars as pl

from invariance.analysis import plots


def curves(epochs: list[int], layers: int = 5) -> pl.DataFrame:
    rows = []
    for epoch in epochs:
        for layer in range(layers):
            value = 0.001 * (layer + 1) * 10**layer * epoch  # early layers near 0, late ones large
            rows.append({"checkpoint": f"epoch={epoch:02d}", "epoch": epoch, "layer": layer, "n_seeds": 3,
                         **{f"{m}_mean": value for m, _ in plots.CURVE_METRICS},
                         **{f"{m}_std": 0.1 * value for m, _ in plots.CURVE_METRICS},
                         **{f"{m}_ci_low": 0.8 * value for m, _ in plots.CURVE_METRICS},
                         **{f"{m}_ci_high": 1.2 * value for m, _ in plots.CURVE_METRICS}})  # fmt: skip
    return pl.DataFrame(rows)


def flow(epochs_and_scales: dict[int, float]) -> pl.DataFrame:
    rows = []
    for epoch, scale in epochs_and_scales.items():
        for i in range(3):
            for j in range(3):
                rows.append({"checkpoint": f"epoch={epoch:02d}", "epoch": epoch, "pt_layer": i, "ft_layer": j,
                             "flow": 0.0 if i == j else scale * (i - j)})  # fmt: skip
    return pl.DataFrame(rows)


def test_flow_heatmaps_of_a_run_share_one_colour_range_and_mark_the_diagonal() -> None:
    table = flow({1: 0.01, 2: 0.2})
    limits = []
    for epoch in (1, 2):
        figure = plots.flow_figure(table, epoch)
        image = figure.axes[0].images[0]
        limits.append(image.get_clim())
        outlined = [p for p in figure.axes[0].patches if isinstance(p, matplotlib.patches.Rectangle)]
        assert len(outlined) == 3  # the diagonal cells
        assert figure.axes[0].get_xlabel() and figure.axes[0].get_ylabel()
    assert limits[0] == limits[1] == (-0.5, 0.5)  # max |flow| 0.4, rounded up to 1, 2 or 5 x 10^k


def test_flow_title_names_the_epoch_once() -> None:
    title = plots.flow_figure(flow({3: 0.1}), 3).axes[0].get_title()
    assert "epoch 3" in title and "epoch=03" not in title
    assert plots.checkpoint_title("run-a/epoch=03", 3) == "epoch 3 (run-a/epoch=03)"


def test_layer_curves_label_every_axis_name_the_band_and_key_epochs_discretely() -> None:
    figure = plots.layer_curves_figure(curves([1, 2, 3]))
    for axis in figure.axes[:3]:
        assert axis.get_xlabel() and axis.get_ylabel()
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert labels == ["epoch 1", "epoch 2", "epoch 3", "shaded: 95% interval over 3 seeds (t)"]


def test_many_epochs_draw_a_dozen_evenly_spaced_each_in_the_key() -> None:
    epochs = list(range(1, 21))
    figure = plots.layer_curves_figure(curves(epochs))
    drawn = plots.evenly_spaced(epochs, plots.CURVE_EPOCHS)
    assert len(drawn) == 12 and drawn[0] == 1 and drawn[-1] == 20
    key = [text.get_text() for text in figure.legends[0].get_texts()]
    assert [t for t in key if t.startswith("epoch")] == [f"epoch {e}" for e in drawn]
    assert figure._suptitle.get_text() == "12 of 20 epochs drawn (all in reduced/curves.parquet)"


def test_dynamics_tell_layers_apart_by_marker_on_linear_axes_alike() -> None:
    """Issue 27: a symlog panel beside linear ones put 0 and 1e-3 side by side as if neighbours."""
    figure = plots.dynamics_figure(curves([1, 2, 3, 4]), depth=4)
    assert {axis.get_yscale() for axis in figure.axes[:3]} == {"linear"}
    axis = figure.axes[0]
    markers = {line.get_marker() for line in axis.get_lines() if len(line.get_xdata()) > 2 and line.get_marker() != "None"}
    assert len(markers) == 5  # one marker per layer, not only colour
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert labels == [*(f"layer {k}" for k in range(4)), "layer 4 (pre-logits)", "shaded: 95% interval over 3 seeds (t)"]


def test_pngs_decode() -> None:
    from PIL import Image
    import io

    for data in (plots.layer_curves_png(curves([1])), plots.dynamics_png(curves([1, 2])),
                 plots.flow_heatmap_png(flow({1: 0.1}), 1)):  # fmt: skip
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and np.asarray(image).std() > 0
