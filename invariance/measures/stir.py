"""STIR, with the pretrained model's inversions (Nanda et al.; the finetuning paper's forgetting,
learning and invariance flow).

Units: one inversion X' of pt[j] per (layer j, seed), shared by every checkpoint (under the
inversion hash, which the checkpoints do not enter), and per point one STIR shard per (reference
model, reference layer, seed): STIR(t[i] | r[j]) for t in {pt, ft} and every layer i, biased and
debiased. Reduced: forgetting, learning and their noise floors per layer (``reduced/curves.parquet``),
the flow matrices (``reduced/flow.parquet``, ``plots/flow/epoch=<e>.png``), the inversions' quality.
"""

from __future__ import annotations

import time
from typing import Any

import polars as pl

from invariance.analysis import metrics, plots, report
from invariance.config import settings_hash
from invariance.core.workspace import RunSpec, Workspace, save_inversion
from invariance.io.layout import REDUCED_FLOW, InversionUnit, StirUnit, Unit, flow_plot_key, reduced_table_key
from invariance.io.schemas import STIR_SCHEMA
from invariance.measures.base import (
    Figure, Measure, MeasureOutputs, PlanSetup, ReduceContext, check_finite, partition_key, record_bytes, register_measure,
    run_title, write_shard,
)  # fmt: skip

REF_MODELS = ("pt", "ft")


@register_measure
class Stir(Measure):
    name = "stir"
    description = "STIR shards (and the pretrained inversions they share)"
    always = True
    gates_checkpoint = True
    schema = STIR_SCHEMA

    def hashes(self, setup: PlanSetup) -> dict[str, str]:
        """The run's settings hash keys the STIR shards; the inversion hash (no checkpoints, no
        layer set) the pretrained inversions, shared by every run and checkpoint."""
        inversion = settings_hash({**setup.config.inversion_settings(), "fingerprints": setup.fingerprints})
        return {self.name: setup.run_hash, "inversion": inversion}

    def units(self, setup: PlanSetup) -> list[Unit]:
        seeds = setup.config.seeds
        inversions: list[Unit] = [InversionUnit(layer, seed) for layer in setup.layers for seed in seeds]
        return inversions + [
            StirUnit(c.epoch, ref_model, layer, seed, c.name, c.url, c.fingerprint, alpha, setup.extra_at(alpha), run=c.run)
            for c, alpha in setup.points
            for ref_model in REF_MODELS
            for layer in setup.layers
            for seed in seeds
        ]

    def hash_name(self, unit: Unit) -> str:
        return "inversion" if isinstance(unit, InversionUnit) else self.name

    def point(self, unit: Unit) -> tuple[str, int, float] | None:
        return (unit.run, unit.epoch, unit.alpha) if isinstance(unit, StirUnit) else None

    def priority(self, unit: Unit) -> int:
        """ft-reference shards first (they invert ft themselves); pt-reference shards last: their
        inversions have had the longest to finish."""
        return 10 if isinstance(unit, StirUnit) and unit.ref_model == "ft" else 90

    def waits_for(self, unit: Unit) -> tuple[Unit, ...]:
        if isinstance(unit, StirUnit) and unit.ref_model == "pt":
            return (InversionUnit(unit.ref_layer, unit.seed),)
        return ()

    def unit_kind(self, unit: Unit) -> tuple[str, str]:
        return ("pretrained inversions", "cached") if isinstance(unit, InversionUnit) else ("STIR shards", "done")

    def has_rows(self, unit: Unit) -> bool:
        return isinstance(unit, StirUnit)

    def compute(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> str:
        if isinstance(unit, InversionUnit):
            return run_inversion(spec, unit, workspace)
        assert isinstance(unit, StirUnit)
        started = time.time()
        context = workspace.context(spec, unit.checkpoint_url, unit.alpha, unit.extra, unit.checkpoint_fingerprint)
        inverted = None
        if unit.ref_model == "pt":
            data_key = InversionUnit(unit.ref_layer, unit.seed).data_key(spec.hash_of("inversion"))
            inverted = workspace.pretrained_inversion(spec.store, data_key)
        rows = context.stir_rows(unit.ref_model, unit.ref_layer, unit.seed, inverted)
        return write_shard(spec, self, unit, rows, started, ref_model=unit.ref_model, ref_layer=unit.ref_layer,
                           seed=unit.seed)  # fmt: skip

    def curve_columns(self, rows: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
        return metrics.stir_curves(rows[self.name])

    def tables(self, context: ReduceContext) -> dict[str, pl.DataFrame]:
        """The flow matrices and the inversions' quality of the changed checkpoints."""
        stir = context.rows[self.name]
        if stir.is_empty():
            return {}
        flow = metrics.flow_table(stir).with_columns(pl.lit(context.plan.settings_hash).alias("settings"))
        return {REDUCED_FLOW: flow, INVERSIONS_TABLE: inversion_stats(stir)}

    def order_table(self, key: str, table: pl.DataFrame) -> pl.DataFrame:
        if key == REDUCED_FLOW:
            return table.sort([*metrics.CHECKPOINT_KEYS, "pt_layer", "ft_layer"])
        return table.sort([*metrics.CHECKPOINT_KEYS, "ref_model", "ref_layer"])

    def reduce(self, context: ReduceContext) -> MeasureOutputs:
        """The flow heatmaps (each complete checkpoint's own rows, one colour range per run), the
        inversions' quality for the report."""
        out = MeasureOutputs()
        flow = context.tables.get(REDUCED_FLOW, pl.DataFrame())
        if not context.complete or flow.is_empty():
            return out
        plan = context.plan
        out.report["inversion_quality"] = inversion_quality(context.tables[INVERSIONS_TABLE])
        if not context.make_plots:
            return out
        keys: dict[int, str] = {}
        for run in dict.fromkeys(run for run, _ in context.complete):
            run_flow = metrics.plain(flow.filter(pl.col("run") == run))
            limit = f"{plots.flow_color_limit(run_flow)!r}"  # shared by the run's epochs: in every heatmap's hash
            epochs = sorted(epoch for done_run, epoch in context.complete if done_run == run)
            for epoch in epochs:
                # the epoch's rows only if hashed: keyed by its partition, an unchanged epoch costs nothing
                rows = lambda run_flow=run_flow, epoch=epoch: run_flow.filter(pl.col("epoch") == epoch)  # noqa: E731
                key = flow_plot_key(epoch, run)
                # a study shows each run's last flow; a single run every epoch's (the report's grid)
                title = f"{run_title(run)}Invariance flow at epoch {epoch}" if run and epoch == epochs[-1] else None
                out.figures.append(Figure(key, rows, lambda run_flow=run_flow, epoch=epoch: plots.flow_heatmap_png(
                    run_flow, epoch, layer_names=plan.layer_names), title=title, extra=limit,
                    partition=partition_key(run, epoch)))  # fmt: skip
                keys[epoch] = key
        if not plan.is_study:
            out.report["flow_plots"] = keys  # figure keys: the engine hands the report their bytes
        return out


# the inversions' quality per checkpoint: what the report's table aggregates over every checkpoint
INVERSIONS_TABLE = reduced_table_key("inversions")


def inversion_stats(stir: pl.DataFrame) -> pl.DataFrame:
    """Per (checkpoint point, ref_model, ref_layer): the sums and extremes of its STIR shards'
    inversion diagnostics, from which ``inversion_quality`` aggregates any set of checkpoints."""
    own = (pl.col("target_model") == pl.col("ref_model")) & (pl.col("target_layer") == pl.col("ref_layer"))
    return stir.group_by(*metrics.CHECKPOINT_KEYS, "ref_model", "ref_layer").agg(
        pl.col("inv_loss_mean").sum().alias("loss_sum"),
        pl.len().alias("rows"),
        pl.col("inv_loss_max").max().alias("loss_worst"),
        pl.col("stir").filter(own).sum().alias("self_stir_sum"),
        own.sum().alias("self_rows"),
        pl.col("inv_iterations").max().alias("iterations"),
    )


def inversion_quality(stats: pl.DataFrame) -> pl.DataFrame:
    """Per (ref_model, ref_layer): the final relative loss of its inversions (mean and worst over
    seeds and checkpoints), STIR(r[j] | r[j]) (1 when X' is indistinguishable at the layer it was
    made for), and ``converged`` (mean loss at most report.CONVERGED_LOSS)."""
    if stats.is_empty():
        return pl.DataFrame()
    return (
        stats.group_by("ref_model", "ref_layer")
        .agg(
            (pl.col("loss_sum").sum() / pl.col("rows").sum()).alias("final_loss_mean"),
            pl.col("loss_worst").max().alias("final_loss_worst"),
            (pl.col("self_stir_sum").sum() / pl.col("self_rows").sum()).alias("self_stir"),
            pl.col("iterations").max().alias("iterations"),
        )
        .with_columns((pl.col("final_loss_mean") <= report.CONVERGED_LOSS).alias("converged"))
        .sort("ref_model", "ref_layer", descending=[True, False])
    )


def run_inversion(spec: RunSpec, unit: InversionUnit, workspace: Workspace) -> str:
    """Invert pt[ref_layer] for the seed and cache X' in the store; returns the record key."""
    started = time.time()
    context = workspace.context(spec, None)
    result = context.invert("pt", unit.ref_layer, unit.seed)
    check_finite(unit, pl.DataFrame({"final_loss": result.final_loss.double().cpu().numpy(),
                                     "images": result.images.flatten(1).double().sum(1).cpu().numpy()}))  # fmt: skip
    inversion_hash = spec.hash_of("inversion")
    data_key = unit.data_key(inversion_hash)
    save_inversion(spec.store, data_key, result)
    record_key = unit.record_key(inversion_hash)
    spec.store.put(
        record_key,
        record_bytes(data_key, len(result.images), started, ref_layer=unit.ref_layer, seed=unit.seed,
                     inversion_hash=inversion_hash, final_loss_mean=float(result.final_loss.mean())),
    )  # fmt: skip
    return record_key


def inversion_layers(units: list[Any]) -> list[int]:
    """The reference layer of every inversion among ``units`` (pretrained ones, and the ft-reference
    STIR shards, which invert ft): what the plan's cost estimate prices."""
    return [u.ref_layer for u in units if isinstance(u, InversionUnit) or (isinstance(u, StirUnit) and u.ref_model == "ft")]
