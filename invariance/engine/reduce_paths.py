"""The reducer's part for weight paths (``interpolation``) and kNN probes (``knn``): the kNN
table, the plots against alpha and per layer, and what the report shows of them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import polars as pl

from invariance.analysis import metrics, plots
from invariance.engine.plan import Plan
from invariance.errors import StorageError
from invariance.io.layout import KNN_ALPHA_PLOT, KNN_LAYERS_PLOT, PLAIN_ALPHA, REDUCED_KNN, interpolation_plot_key
from invariance.io.storage import Store, parquet_bytes

log = logging.getLogger(__name__)

KNN_TABLE_COLUMNS = ("run", "checkpoint", "epoch", "alpha", "model", "layer", "k", "top1", "top5", "n_train", "n_test",
                     "settings")  # fmt: skip


@dataclass
class PathOutputs:
    """What the reducer writes and the report shows for weight paths and kNN probes."""

    knn: pl.DataFrame = field(default_factory=pl.DataFrame)
    files: dict[str, bytes] = field(default_factory=dict)  # key -> bytes
    plots: dict[str, bytes] = field(default_factory=dict)  # report title -> PNG
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # report title -> table


def plain(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows of the checkpoints themselves (alpha 1): what the per-epoch plots and the
    robustness link read."""
    if frame.is_empty() or "alpha" not in frame.columns:
        return frame
    return frame.filter(pl.col("alpha") == PLAIN_ALPHA)


def knn_table(plan: Plan, store: Store) -> pl.DataFrame:
    """``reduced/knn.parquet`` from the completed kNN shards of ``plan``: pt once (epoch and alpha
    null), each checkpoint at each alpha of its path. An unreadable shard is logged and left out."""
    done = [u for u in plan.knn if plan.is_done(u)]
    if not done:
        return pl.DataFrame()
    try:
        frame = store.read_parquet([plan.data_key(u) for u in done], how="diagonal_relaxed")
    except StorageError as exc:
        log.warning("reduced/knn.parquet not rebuilt: %s", exc)
        return pl.DataFrame()
    names = {c.epoch: c.name for c in plan.checkpoints}
    return (
        frame.with_columns(
            pl.when(pl.col("model") == "ft")
            .then(pl.col("epoch").replace_strict(names, default=pl.col("checkpoint"), return_dtype=pl.String))
            .otherwise(pl.col("checkpoint"))
            .alias("checkpoint"),
            pl.col("run").fill_null(""),
            pl.lit(plan.knn_hash).alias("settings"),
        )
        .select(KNN_TABLE_COLUMNS)
        .sort("model", "epoch", "alpha", "layer", "k", descending=[True, False, False, False, False], nulls_last=False)
    )


def path_outputs(plan: Plan, store: Store, curves: pl.DataFrame, make_plots: bool) -> PathOutputs:
    """The kNN table and plots, and the plots against alpha of the checkpoints with a weight path."""
    out = PathOutputs(knn=knn_table(plan, store) if plan.knn else pl.DataFrame())
    if not out.knn.is_empty():
        out.files[REDUCED_KNN] = parquet_bytes(out.knn)
    path_epochs = (
        sorted(curves.filter(pl.col("alpha") != PLAIN_ALPHA)["epoch"].unique().to_list())
        if not curves.is_empty() and "alpha" in curves.columns else []
    )  # fmt: skip
    if path_epochs:
        columns = [*metrics.CHECKPOINT_KEYS, "layer", "forgetting_mean", "learning_mean", "cka_divergence_mean"]
        out.tables["Along the weight path: mean over seeds per alpha and layer"] = (
            curves.filter(pl.col("epoch").is_in(path_epochs)).select(columns).sort("epoch", "alpha", "layer")
        )
    if not out.knn.is_empty():
        k = out.knn["k"].min() if 20 not in out.knn["k"].to_list() else 20
        out.tables[f"kNN accuracy per layer (k = {k}; pt: the pretrained model)"] = (
            out.knn.filter(pl.col("k") == k).select("model", "epoch", "alpha", "layer", "top1", "top5", "n_train", "n_test")
        )
    if not make_plots:
        return out
    for epoch in path_epochs:
        png = plots.interpolation_png(curves, epoch)
        out.files[interpolation_plot_key(epoch)] = png
        out.plots[f"Along the weight path to epoch {epoch}: forgetting, learning and CKA divergence against alpha"] = png
    if not out.knn.is_empty():
        out.files[KNN_LAYERS_PLOT] = out.plots["kNN top-1 per layer"] = plots.knn_layers_png(out.knn)
        if not out.knn.filter(pl.col("alpha") != PLAIN_ALPHA).is_empty():
            out.files[KNN_ALPHA_PLOT] = out.plots["kNN top-1 against alpha"] = plots.knn_alpha_png(out.knn)
    return out
