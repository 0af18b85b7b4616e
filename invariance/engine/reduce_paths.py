"""The reducer's part for weight paths (``interpolation``) and kNN probes (``knn``): the kNN
table, the plots against alpha and per layer, and what the report shows of them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import polars as pl

from invariance.analysis import metrics, plots
from invariance.engine.plan import Plan
from invariance.errors import StorageError
from invariance.io.layout import (
    PLAIN_ALPHA, REDUCED_KNN, interpolation_plot_key, knn_alpha_plot_key, knn_layers_plot_key,
)  # fmt: skip
from invariance.io.schemas import KNN_SCHEMA, conform
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
        frame = conform(store.read_parquet([plan.data_key(u) for u in done], how="diagonal_relaxed"), KNN_SCHEMA)
    except StorageError as exc:
        log.warning("reduced/knn.parquet not rebuilt: %s", exc)
        return pl.DataFrame()
    names = checkpoint_names(plan)
    return (
        frame.with_columns(pl.col("run").fill_null(""))
        .join(names.rename({"checkpoint": "plan_checkpoint"}), on=["run", "epoch"], how="left")
        .with_columns(
            pl.when(pl.col("model") == "ft")
            .then(pl.col("plan_checkpoint").fill_null(pl.col("checkpoint")))
            .otherwise(pl.col("checkpoint"))
            .alias("checkpoint"),
            pl.lit(plan.knn_hash).alias("settings"),
        )
        .select(KNN_TABLE_COLUMNS)
        .sort("model", "run", "epoch", "alpha", "layer", "k", descending=[True, False, False, False, False, False],
              nulls_last=False)  # fmt: skip
    )


def checkpoint_names(plan: Plan) -> pl.DataFrame:
    """(run, epoch, checkpoint): the plan's name of every checkpoint, to join onto shard rows (keyed
    by run and epoch), so that rows written under another naming still group with their checkpoint."""
    return pl.DataFrame(
        {"run": [c.run for c in plan.checkpoints], "epoch": [c.epoch for c in plan.checkpoints],
         "checkpoint": [c.name for c in plan.checkpoints]},
        schema={"run": pl.String, "epoch": pl.Int64, "checkpoint": pl.String},
    )  # fmt: skip


def run_title(run: str) -> str:
    """``run <name>: `` before a study run's plot titles; empty for a single run."""
    return f"run {run}: " if run else ""


def path_outputs(plan: Plan, store: Store, curves: pl.DataFrame, make_plots: bool) -> PathOutputs:
    """The kNN table and plots, and the plots against alpha of the checkpoints with a weight path."""
    out = PathOutputs(knn=knn_table(plan, store) if plan.knn else pl.DataFrame())
    if not out.knn.is_empty():
        out.files[REDUCED_KNN] = parquet_bytes(out.knn)
    # (run, epoch) of the checkpoints with a weight path
    path_checkpoints = (
        sorted(curves.filter(pl.col("alpha") != PLAIN_ALPHA).select("run", "epoch").unique().iter_rows())
        if not curves.is_empty() and "alpha" in curves.columns else []
    )  # fmt: skip
    if path_checkpoints:
        columns = [*metrics.CHECKPOINT_KEYS, "layer", "forgetting_mean", "learning_mean", "cka_divergence_mean"]
        out.tables["Along the weight path: mean over seeds per alpha and layer"] = (
            curves.join(pl.DataFrame(path_checkpoints, schema=["run", "epoch"], orient="row"), on=["run", "epoch"],
                        how="semi")
            .select(columns)
            .sort("run", "epoch", "alpha", "layer")
        )  # fmt: skip
    if not out.knn.is_empty():
        k = out.knn["k"].min() if 20 not in out.knn["k"].to_list() else 20
        out.tables[f"kNN accuracy per layer (k = {k}; pt: the pretrained model)"] = (
            out.knn.filter(pl.col("k") == k).select("run", "checkpoint", "model", "epoch", "alpha", "layer", "top1", "top5",
                                                    "n_train", "n_test")  # fmt: skip
        )
    if not make_plots:
        return out
    for run, epoch in path_checkpoints:
        png = plots.interpolation_png(curves.filter(pl.col("run") == run), epoch)
        out.files[interpolation_plot_key(epoch, run)] = png
        out.plots[f"{run_title(run)}Along the weight path to epoch {epoch}: forgetting, learning and CKA divergence "
                  "against alpha"] = png  # fmt: skip
    if out.knn.is_empty():
        return out
    for run in dict.fromkeys(out.knn.filter(pl.col("model") == "ft")["run"].to_list()):
        # each run's checkpoints beside the pretrained model's rows (shared by every run)
        rows = out.knn.filter((pl.col("model") == "pt") | (pl.col("run") == run))
        out.files[knn_layers_plot_key(run)] = out.plots[f"{run_title(run)}kNN top-1 per layer"] = plots.knn_layers_png(rows)
        if not rows.filter(pl.col("alpha") != PLAIN_ALPHA).is_empty():
            out.files[knn_alpha_plot_key(run)] = out.plots[f"{run_title(run)}kNN top-1 against alpha"] = plots.knn_alpha_png(rows)
    return out
