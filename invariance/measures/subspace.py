"""Subspace similarity (Ramasesh, Dyer and Raghu 2021; ``core/subspace.py``) of ft[i] and pt[i] on
X at every layer, k = 10 principal directions, one shard per point.

Reduced: the ``subspace_similarity`` column of ``reduced/curves.parquet``. CKA shards of releases
before measures were plug-ins held it in their own ``subspace_similarity`` column: a point without
a subspace shard takes it from there, so old outputs reduce as before (the next run computes the
subspace shards, features only)."""

from __future__ import annotations

import math
import time
from typing import Any

import polars as pl

from invariance.analysis import metrics
from invariance.core.shards import MODEL_NAMES, ShardContext, batched_features
from invariance.core.subspace import DEFAULT_COMPONENTS, subspace_similarity
from invariance.core.workspace import RunSpec, Workspace
from invariance.io.layout import Unit
from invariance.io.schemas import POINT_SCHEMA, PROVENANCE_SCHEMA
from invariance.measures.base import Measure, check_finite_features, register_measure, write_shard

SUBSPACE_SCHEMA: dict[str, Any] = {
    **POINT_SCHEMA, "layer": pl.Int64, "components": pl.Int64, "subspace_similarity": pl.Float64,
    "n_samples": pl.Int64, **PROVENANCE_SCHEMA,
}  # fmt: skip


def subspace_rows(context: ShardContext, unit: Any = None) -> list[dict[str, Any]]:
    """SubspaceSim_k(ft[i](X), pt[i](X)) per layer i, k = DEFAULT_COMPONENTS; None where undefined
    (fewer than k + 1 samples, or fewer than k directions of variance). One layer at a time: two
    layers' features at most are held. NumericsError for features that are not finite (a broken
    model), never a null row."""
    rows = []
    for layer in context.layers:
        pt, ft = (batched_features(context.models[name], context.eval_images.images, [layer], context.token_policy)[layer]
                  for name in MODEL_NAMES)  # fmt: skip
        check_finite_features(unit, layer, pt, ft)
        value = None if context.n_samples <= DEFAULT_COMPONENTS else subspace_similarity(ft, pt, DEFAULT_COMPONENTS)
        rows.append({"layer": layer, "components": DEFAULT_COMPONENTS,
                     "subspace_similarity": None if value is None or math.isnan(value) else value,
                     "n_samples": context.n_samples})  # fmt: skip
    return rows


@register_measure
class Subspace(Measure):
    name = "subspace"
    description = "subspace similarity shards"
    always = True
    schema = SUBSPACE_SCHEMA
    # undefined with fewer than k + 1 samples, or fewer than k directions of variance
    nullable = frozenset({"subspace_similarity"})

    def settings(self) -> dict[str, Any]:
        return {"components": DEFAULT_COMPONENTS}

    def priority(self, unit: Unit) -> int:
        return 25

    def rows(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> list[dict[str, Any]]:
        context = workspace.context(spec, unit.checkpoint_url, unit.alpha, unit.extra, unit.checkpoint_fingerprint)
        return subspace_rows(context, unit)

    def compute(self, spec: RunSpec, unit: Unit, workspace: Workspace) -> str:
        started = time.time()
        return write_shard(spec, self, unit, self.rows(spec, unit, workspace), started)

    def curve_columns(self, rows: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
        """Its own rows, and, for points without them, the column of older CKA shards."""
        keys = [*metrics.CHECKPOINT_KEYS, "layer"]
        own = rows[self.name]
        own = (own.select(*keys, "subspace_similarity") if not own.is_empty()
               else pl.DataFrame(schema={**{k: SUBSPACE_SCHEMA[k] for k in keys}, "subspace_similarity": pl.Float64}))  # fmt: skip
        legacy = rows.get("cka")
        if legacy is None or legacy.is_empty() or "subspace_similarity" not in legacy.columns:
            return own
        older = metrics.subspace_curve(legacy).filter(pl.col("subspace_similarity").is_not_null())
        return pl.concat([own, older.join(own, on=keys, how="anti").select(own.columns)])
