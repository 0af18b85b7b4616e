"""Linear CKA (Kornblith et al. 2019; float64, biased and debiased) between every layer pair of pt
and ft on the eval images X, one shard per point.

Reduced: CKA divergence per layer (``reduced/curves.parquet``), every pair of the complete points
(``reduced/cka.parquet``) and the layer x layer heatmap of pt against ft per checkpoint.
"""

from __future__ import annotations

import time

import polars as pl

from invariance.analysis import metrics
from invariance.core.workspace import RunSpec, Workspace
from invariance.io.layout import Unit, reduced_table_key
from invariance.io.schemas import CKA_SCHEMA
from invariance.measures.base import Measure, MeasureOutputs, PlanSetup, ReduceContext, register_measure, write_shard
from invariance.measures.pairwise import heatmap_figures, pair_table


@register_measure
class Cka(Measure):
    name = "cka"
    description = "CKA shards"
    always = True
    gates_checkpoint = True
    schema = CKA_SCHEMA
    nullable = frozenset({"subspace_similarity"})  # a column of older shards (the subspace measure's now)

    def hashes(self, setup: PlanSetup) -> dict[str, str]:
        """Keyed by the run's settings hash, as before measures were plug-ins."""
        return {self.name: setup.run_hash}

    def priority(self, unit: Unit) -> int:
        return 20

    def unit_kind(self, unit: Unit) -> tuple[str, str]:
        return "CKA shards", "done"

    def compute(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> str:
        started = time.time()
        context = workspace.context(spec, unit.checkpoint_url, unit.alpha, unit.extra, unit.checkpoint_fingerprint)
        return write_shard(spec, self, unit, context.cka_rows(), started)

    def curve_columns(self, rows: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
        return metrics.cka_curves(rows[self.name])

    def tables(self, context: ReduceContext) -> dict[str, pl.DataFrame]:
        return {reduced_table_key(self.name): pair_table(context.rows[self.name], ["cka", "cka_debiased"],
                                                         context.plan.hashes[self.name])}  # fmt: skip

    def reduce(self, context: ReduceContext) -> MeasureOutputs:
        table = context.tables.get(reduced_table_key(self.name), pl.DataFrame())
        return MeasureOutputs(figures=heatmap_figures(context, self.name, table, "cka", "linear CKA on the eval images",
                                                      "CKA between pretrained and finetuned layers", low=0.0, high=1.0))  # fmt: skip
