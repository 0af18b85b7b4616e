"""The reducer's part for weight paths (``interpolation``): the curves against alpha of each
checkpoint with a path, its table and plots, and the plan's names of the checkpoints."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import polars as pl

from invariance.analysis import metrics, plots
from invariance.engine.plan import Plan
from invariance.io.layout import PLAIN_ALPHA, interpolation_plot_key
from invariance.measures.base import Figure, run_title

log = logging.getLogger(__name__)


@dataclass
class PathOutputs:
    """What the reducer writes and the report shows for weight paths."""

    figures: list[Figure] = field(default_factory=list)  # drawn when their rows change
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # report title -> table


def checkpoint_names(plan: Plan) -> pl.DataFrame:
    """(run, epoch, checkpoint): the plan's name of every checkpoint, to join onto shard rows (keyed
    by run and epoch), so that rows written under another naming still group with their checkpoint."""
    return pl.DataFrame(
        {"run": [c.run for c in plan.checkpoints], "epoch": [c.epoch for c in plan.checkpoints],
         "checkpoint": [c.name for c in plan.checkpoints]},
        schema={"run": pl.String, "epoch": pl.Int64, "checkpoint": pl.String},
    )  # fmt: skip


def path_outputs(curves: pl.DataFrame, make_plots: bool, layer_names: list[str] | None = None) -> PathOutputs:
    """The table and the plots against alpha of the checkpoints with a weight path."""
    out = PathOutputs()
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
    if not make_plots:
        return out
    for run, epoch in path_checkpoints:
        rows = curves.filter(pl.col("run") == run)
        out.figures.append(Figure(
            interpolation_plot_key(epoch, run), rows.filter(pl.col("epoch") == epoch),
            lambda rows=rows, epoch=epoch: plots.interpolation_png(rows, epoch, layer_names=layer_names),
            title=f"{run_title(run)}Along the weight path to epoch {epoch}: forgetting, learning and CKA divergence against alpha",
        ))  # fmt: skip
    return out
