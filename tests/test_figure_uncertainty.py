"""Issue 27: every figure reads back what it shows. The band drawn is the 95% interval the table
holds (read from the fill_between polygon), named in the legend with its number of seeds; points
not above the noise floor are hollow; one seed says so; the pre-logits layer is named; the weight
path starts at alpha 0 (the pretrained model); lines on top of each other are named."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from invariance.analysis import metrics, plots, robustness

LAYERS = 4  # layers 0..4, depth 4: layer 4 is the pre-logits
DEPTH = 4


def seed_rows(epochs: list[int], seeds: int, alphas: tuple[float, ...] = (1.0,)) -> pl.DataFrame:
    """Per-seed forgetting / learning / CKA divergence values with a spread that grows by layer."""
    rng = np.random.default_rng(7)
    rows = []
    for epoch in epochs:
        for alpha in alphas:
            for layer in range(LAYERS + 1):
                for seed in range(seeds):
                    base = 0.02 * (layer + 1) * epoch * alpha
                    rows.append({"run": "", "checkpoint": f"epoch={epoch:02d}", "epoch": epoch, "alpha": alpha,
                                 "layer": layer, "seed": seed,
                                 "forgetting": base + rng.normal(0, 0.01 * (layer + 1)),
                                 "learning": base / 2 + rng.normal(0, 0.01), "cka_divergence": base})  # fmt: skip
    return pl.DataFrame(rows)


def curves_table(epochs: list[int], seeds: int = 3, alphas: tuple[float, ...] = (1.0,)) -> pl.DataFrame:
    """A curves table as the reducer builds it: mean, std and the 95% t-interval over seeds
    (metrics.over_seeds), CKA without an interval, and ``_above_noise`` (false for layers 0, 1)."""
    values = seed_rows(epochs, seeds, alphas)
    keys = [*metrics.CHECKPOINT_KEYS, "layer"]
    table = metrics.over_seeds(values, "forgetting", keys)
    table = table.join(metrics.over_seeds(values, "learning", keys).drop("n_seeds"), on=keys)
    cka = values.group_by(keys).agg(pl.col("cka_divergence").first().alias("cka_divergence_mean")).with_columns(
        pl.lit(0.0).alias("cka_divergence_std"), pl.col("cka_divergence_mean").alias("cka_divergence_ci_low"),
        pl.col("cka_divergence_mean").alias("cka_divergence_ci_high"),
    )  # fmt: skip
    above = pl.when(pl.col("n_seeds") >= 2).then(pl.col("layer") >= 2).otherwise(None)
    return (
        table.join(cka, on=keys)
        .with_columns(above.alias("forgetting_above_noise"), above.alias("learning_above_noise"))
        .sort(keys)
    )


def legend_texts(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def band(axis, label: str) -> np.ndarray:
    """The vertices of the fill_between polygon(s) labelled ``_band {label}``."""
    found = [c for c in axis.collections if c.get_label() == f"_band {label}"]
    assert len(found) == 1, [c.get_label() for c in axis.collections]
    return np.concatenate([path.vertices for path in found[0].get_paths()])


def assert_band_is_interval(axis, label: str, rows: pl.DataFrame, x: str, metric: str) -> None:
    """At each x, the polygon spans exactly [ci_low, ci_high] of the table's row."""
    vertices = band(axis, label)
    for value, low, high in rows.select(x, f"{metric}_ci_low", f"{metric}_ci_high").iter_rows():
        ys = vertices[np.isclose(vertices[:, 0], value), 1]
        assert ys.min() == pytest.approx(low, abs=1e-12) and ys.max() == pytest.approx(high, abs=1e-12), (label, value)


def hollow_x(axis, label: str) -> list[float]:
    lines = [line for line in axis.get_lines() if line.get_label() == f"_below noise {label}"]
    assert all(line.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0)) for line in lines)
    return sorted(float(x) for line in lines for x in line.get_xdata())


def test_layer_curves_shade_the_tables_95_interval_and_hollow_what_is_not_above_noise() -> None:
    table = curves_table([1, 2], seeds=2)  # 2 seeds: t = 12.7, the interval is far wider than +-1 std
    figure = plots.layer_curves_figure(table, depth=DEPTH)
    forgetting_axis, learning_axis, cka_axis = figure.axes[:3]
    for epoch in (1, 2):
        rows = table.filter(pl.col("epoch") == epoch).sort("layer")
        assert_band_is_interval(forgetting_axis, f"epoch {epoch}", rows, "layer", "forgetting")
        assert_band_is_interval(learning_axis, f"epoch {epoch}", rows, "layer", "learning")
        assert hollow_x(forgetting_axis, f"epoch {epoch}") == [0.0, 1.0]
    assert not [c for c in cka_axis.collections if c.get_label().startswith("_band")]  # CKA: nothing to shade
    assert "no interval" in cka_axis.get_title()
    texts = legend_texts(figure)
    assert "shaded: 95% interval over 2 seeds (t)" in texts and plots.NOISE_LABEL in texts
    assert forgetting_axis.get_xticklabels()[-1].get_text() == "pre-logits"
    assert forgetting_axis.get_xlabel() == "layer" and "mean over seeds" in forgetting_axis.get_ylabel()


def test_one_seed_draws_no_band_and_says_so() -> None:
    table = curves_table([1, 2], seeds=1)
    assert table["forgetting_ci_low"].null_count() == table.height
    figure = plots.layer_curves_figure(table)
    assert not [c for axis in figure.axes for c in axis.collections if c.get_label().startswith("_band")]
    texts = legend_texts(figure)
    assert plots.ONE_SEED_LABEL in texts and not any(text.startswith("shaded") for text in texts)


def test_dynamics_shade_each_layers_interval_on_linear_axes_and_name_the_pre_logits() -> None:
    table = curves_table([1, 2, 3], seeds=3)
    figure = plots.dynamics_figure(table, depth=DEPTH)
    assert [axis.get_yscale() for axis in figure.axes[:3]] == ["linear"] * 3
    for layer in range(LAYERS + 1):
        label = f"layer {layer}" + (" (pre-logits)" if layer == DEPTH else "")
        rows = table.filter(pl.col("layer") == layer).sort("epoch")
        assert_band_is_interval(figure.axes[0], label, rows, "epoch", "forgetting")
    texts = legend_texts(figure)
    assert "layer 4 (pre-logits)" in texts and "shaded: 95% interval over 3 seeds (t)" in texts
    assert plots.NOISE_LABEL in texts
    # layer_names (a plan's) name the pre-logits too; a model of named modules has none
    named = plots.dynamics_figure(table, layer_names=[f"blocks.{k}" for k in range(LAYERS)] + ["pre-logits"])
    assert "layer 4 (pre-logits)" in legend_texts(named)
    modules = plots.dynamics_figure(table, layer_names=[f"stage{k}" for k in range(LAYERS + 1)])
    assert "layer 4" in legend_texts(modules) and "layer 4 (pre-logits)" not in legend_texts(modules)


def test_the_weight_path_starts_at_alpha_0_the_pretrained_model() -> None:
    table = curves_table([3], seeds=3, alphas=(0.5, 1.0))
    figure = plots.interpolation_figure(table, 3, depth=DEPTH)
    for axis, metric in zip(figure.axes[:3], ("forgetting", "learning", "cka_divergence")):
        lines = [line for line in axis.get_lines() if line.get_label().startswith("_line layer")]
        assert len(lines) == LAYERS + 1
        for line in lines:
            assert line.get_xdata()[0] == 0.0 and line.get_ydata()[0] == 0.0  # 0 by definition
        stars = [line for line in axis.get_lines() if line.get_label() == "_pretrained"]
        assert len(stars) == 1 and list(stars[0].get_xdata()) == [0.0]
        if metric != "cka_divergence":
            rows = table.filter(pl.col("layer") == 2).sort("alpha")
            assert_band_is_interval(axis, "layer 2", rows, "alpha", metric)
    assert figure.axes[0].get_xlim()[0] < 0.0
    texts = legend_texts(figure)
    assert any(text.startswith("alpha 0: the pretrained model") for text in texts)
    assert "layer 4 (pre-logits)" in texts and "shaded: 95% interval over 3 seeds (t)" in texts
    # a path that computed alpha 0 draws its own rows, no added point
    computed = curves_table([3], seeds=3, alphas=(0.0, 1.0))
    again = plots.interpolation_figure(computed, 3)
    assert not [line for line in again.axes[0].get_lines() if line.get_label() == "_pretrained"]


def knn_rows(n_test: int = 200) -> pl.DataFrame:
    rows = []
    for layer in range(LAYERS + 1):
        rows.append({"run": "", "checkpoint": "pretrained", "epoch": None, "alpha": None, "model": "pt", "layer": layer,
                     "k": 20, "top1": 0.3 + 0.1 * layer, "top5": 0.9, "n_train": 100, "n_test": n_test})  # fmt: skip
        for alpha in (0.5, 1.0):
            rows.append({"run": "", "checkpoint": "epoch=03", "epoch": 3, "alpha": alpha, "model": "ft", "layer": layer,
                         "k": 20, "top1": 0.35 + 0.05 * layer * alpha, "top5": 0.9, "n_train": 100, "n_test": n_test})  # fmt: skip
    return pl.DataFrame(rows)


def test_knn_against_alpha_starts_at_the_pretrained_models_accuracy() -> None:
    knn = knn_rows()
    figure = plots.knn_alpha_figure(knn, depth=DEPTH)
    axis = figure.axes[0]
    drawn = [line for line in axis.get_lines() if len(line.get_xdata()) == 3]
    assert len(drawn) == LAYERS + 1
    pretrained = dict(knn.filter(pl.col("model") == "pt").select("layer", "top1").iter_rows())
    starts = sorted(float(line.get_ydata()[0]) for line in drawn)
    assert all(line.get_xdata()[0] == 0.0 for line in drawn)
    assert starts == pytest.approx(sorted(pretrained.values()))
    texts = legend_texts(figure)
    assert any(text.startswith("alpha 0: the pretrained model") for text in texts) and "layer 4 (pre-logits)" in texts
    assert "no interval" in axis.get_title() and "200 test images" in axis.get_title()


def test_knn_per_layer_names_the_pre_logits_and_says_it_has_no_interval() -> None:
    figure = plots.knn_layers_figure(knn_rows(), depth=DEPTH)
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["0", "1", "2", "3", "pre-logits"]
    assert "no interval" in axis.get_title()


def test_flow_marks_cells_whose_interval_includes_zero() -> None:
    rows = []
    for seed in range(3):
        for i in range(3):
            for j in range(3):
                # cell (0, 2) is noise around 0; every other off-diagonal cell is clearly non-zero
                value = 0.0 if i == j else (0.05 * (-1) ** seed if (i, j) == (0, 2) else 0.3 * (i - j) + 0.01 * seed)
                rows.append({"run": "", "checkpoint": "epoch=01", "epoch": 1, "alpha": 1.0, "pt_layer": i, "ft_layer": j,
                             "seed": seed, "flow": value})  # fmt: skip
    keys = [*metrics.CHECKPOINT_KEYS, "pt_layer", "ft_layer"]
    table = metrics.over_seeds(pl.DataFrame(rows), "flow", keys).rename({"flow_mean": "flow"})
    figure = plots.flow_figure(table, 1, depth=2)
    axis = figure.axes[0]
    dots = [line for line in axis.get_lines() if line.get_label() == "_interval includes 0"]
    assert len(dots) == 1 and list(zip(dots[0].get_xdata(), dots[0].get_ydata())) == [(2, 0)]
    assert "95% interval over 3 seeds includes 0" in axis.get_title()
    assert [t.get_text() for t in axis.get_yticklabels()] == ["0", "1", "pre-logits"]


def test_lines_on_top_of_each_other_are_named() -> None:
    table = curves_table([1, 2], seeds=3)
    same = pl.concat([table, table.filter(pl.col("epoch") == 2).with_columns(pl.lit(5, dtype=pl.Int64).alias("epoch"))])
    figure = plots.layer_curves_figure(same)
    notes = [text.get_text() for text in figure.axes[0].texts]
    assert notes == ["on top of each other: epoch 2 = epoch 5"]
    assert not plots.layer_curves_figure(table).axes[0].texts


def test_many_coinciding_epochs_keep_a_short_note_and_full_size_panels() -> None:
    """14 epochs of which 13 are copies of epoch 2 (an LP stage leaves the backbone unchanged; the rerun
    bench's epochs are copies): the note listed all 11 drawn copies, wrapped to the figure's width,
    and the constrained layout gave up ("axes sizes collapsed to zero"), drawing each panel a sliver."""
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    table = curves_table([1, 2], seeds=3)
    copies = [table.filter(pl.col("epoch") == 2).with_columns(pl.lit(e, dtype=pl.Int64).alias("epoch")) for e in range(3, 15)]
    same = pl.concat([table, *copies])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = plots.layer_curves_figure(same)
        plots.png_bytes(figure)
    assert not [w for w in caught if "constrained_layout" in str(w.message)], [str(w.message) for w in caught]
    plain = plots.layer_curves_figure(table)
    plots.png_bytes(plain)
    widths = [axis.get_position().width for axis in figure.axes[:3]]
    assert min(widths) > 0.9 * min(axis.get_position().width for axis in plain.axes[:3]), widths
    renderer = FigureCanvasAgg(figure).get_renderer()
    for axis in figure.axes[:3]:
        (note,) = [text.get_text() for text in axis.texts]
        assert note == "on top of each other: epoch 2 = 10 others (epochs 3, 5-10, 12-14)"
        extent, box = axis.texts[0].get_window_extent(renderer), axis.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1


def test_a_coinciding_group_is_named_in_a_few_words_whatever_its_size() -> None:
    assert plots.coinciding_text(["epoch 2", "epoch 5", "epoch 9"]) == "epoch 2 = epoch 5 = epoch 9"
    spread = [f"epoch {e}" for e in range(1, 501, 45)]
    assert plots.coinciding_text(spread) == "epoch 1 = 11 others (epochs 46 to 496)"
    assert plots.coinciding_text(["a", "b", "c", "d", "e"]) == "a = 4 others (b ... e)"


def robustness_inputs(runs: tuple[str, ...]) -> tuple[pl.DataFrame, pl.DataFrame]:
    rows = []
    for run in runs:
        for epoch, (spread, accuracy) in enumerate([(0.1, 0.8), (0.2, 0.7), (0.25, 0.55), (0.05, 0.9), (0.15, 0.75)], 1):
            rows.append({"run": run, "epoch": epoch, "checkpoint": f"epoch={epoch:02d}", "forgetting_std_across_layers": spread,
                         "corrupted_accuracy_mean": accuracy, "clean_accuracy": 0.9, "corrupted_loss_mean": 2 - accuracy,
                         "n_layers": 3})  # fmt: skip
    table = pl.DataFrame(rows)
    return table, robustness.robustness_correlation(table)


def test_robustness_colours_its_two_axes_and_names_no_empty_run() -> None:
    import matplotlib.colors

    table, correlation = robustness_inputs(("",))
    figure = robustness.robustness_figure(table, correlation, depth=DEPTH)
    over_epochs, scatter, twin = figure.axes
    spread_color = matplotlib.colors.to_rgba(robustness.SPREAD_COLOR)
    score_color = matplotlib.colors.to_rgba(robustness.SCORE_COLOR)
    assert matplotlib.colors.to_rgba(over_epochs.yaxis.label.get_color()) == spread_color
    assert matplotlib.colors.to_rgba(twin.yaxis.label.get_color()) == score_color
    assert all(matplotlib.colors.to_rgba(line.get_color()) == spread_color for line in over_epochs.get_lines())
    assert all(matplotlib.colors.to_rgba(line.get_color()) == score_color for line in twin.get_lines())
    assert "left axis" in over_epochs.get_ylabel() and "right axis" in twin.get_ylabel()
    assert "pre-logits" in over_epochs.get_ylabel() and "pre-logits" in scatter.get_xlabel()
    quantity_texts = [t.get_text() for t in twin.get_legend().get_texts()]
    assert quantity_texts == ["forgetting spread (left axis)", "mean corrupted accuracy (right axis)"]
    (label,) = [t.get_text() for t in scatter.get_legend().get_texts()]
    assert label.startswith("r = ") and "95% interval [" in label and "(n = 5 epochs)" in label
    assert not label.startswith("run") and "  " not in label


def test_robustness_of_a_study_names_runs_and_what_hides_what() -> None:
    table, correlation = robustness_inputs(("lr=0.1", "lr=0.01"))
    figure = robustness.robustness_figure(table, correlation, depth=DEPTH)
    over_epochs, scatter, twin = figure.axes
    labels = [t.get_text() for t in scatter.get_legend().get_texts()]
    assert [label.split(":")[0] for label in labels] == ["lr=0.1", "lr=0.01"]
    assert {t.get_text() for t in twin.get_legend().get_texts()} >= {"lr=0.1", "lr=0.01"}
    notes = [t.get_text() for axis in figure.axes for t in axis.texts if t.get_text().startswith("on top")]
    assert len(notes) == 3  # the two runs' identical spread, accuracy and scatter


def test_layer_curves_of_many_epochs_draw_a_dozen_evenly_spaced_and_say_so() -> None:
    """500 epochs: 500 lines were unreadable and took 90 s to draw on every rerun (bench_reruns)."""
    import polars as pl

    from invariance.analysis import plots

    rows = [{"run": "", "checkpoint": f"e{e}", "epoch": e, "alpha": 1.0, "layer": layer, "n_seeds": 1,
             **{f"{m}_{s}": 0.01 * e for m in ("forgetting", "learning", "cka_divergence") for s in ("mean", "ci_low", "ci_high")},
             **{f"{m}_std": None for m in ("forgetting", "learning", "cka_divergence")}}
            for e in range(1, 501) for layer in range(3)]  # fmt: skip
    figure = plots.layer_curves_figure(pl.DataFrame(rows, infer_schema_length=None), title="run a")
    drawn = {text.get_text() for text in figure.legends[0].get_texts() if text.get_text().startswith("epoch")}
    assert len(drawn) == plots.CURVE_EPOCHS and {"epoch 1", "epoch 500"} <= drawn
    assert "12 of 500 epochs drawn" in figure._suptitle.get_text()
