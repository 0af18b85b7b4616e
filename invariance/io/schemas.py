"""The column types of every kind of row the project writes: one table per row kind.

Frames built from Python rows take their types from here, never from inference: Polars infers a
column's type from the first 100 rows, so a column null in those rows (CKA's
``subspace_similarity`` is null on the first L^2 rows, L = layers) became a Null column and the
first value after it failed (every CKA shard at 10 or more layers). The reducer conforms what it
reads to the same tables, so shards of older releases (lacking ``run``, ``alpha`` or
``checkpoint_fingerprint``) read with the same types.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import polars as pl

Schema = Mapping[str, pl.DataType | type[pl.DataType]]

# what keys every shard: the settings hash, then (run, checkpoint, epoch, alpha) of the model point
POINT_SCHEMA: dict[str, Any] = {
    "settings": pl.String, "run": pl.String, "checkpoint": pl.String, "epoch": pl.Int64, "alpha": pl.Float64,
}  # fmt: skip
# written last in every shard: the package version and the fingerprint of the checkpoint's file
PROVENANCE_SCHEMA: dict[str, Any] = {"version": pl.String, "checkpoint_fingerprint": pl.String}

STIR_SCHEMA: dict[str, Any] = {
    **POINT_SCHEMA,
    "ref_model": pl.String, "ref_layer": pl.Int64, "target_model": pl.String, "target_layer": pl.Int64,
    "seed": pl.Int64, "stir": pl.Float64, "stir_debiased": pl.Float64, "inv_loss_mean": pl.Float64,
    "inv_loss_median": pl.Float64, "inv_loss_max": pl.Float64, "inv_iterations": pl.Int64, "n_samples": pl.Int64,
    **PROVENANCE_SCHEMA,
}  # fmt: skip
CKA_SCHEMA: dict[str, Any] = {
    **POINT_SCHEMA,
    "model_a": pl.String, "layer_a": pl.Int64, "model_b": pl.String, "layer_b": pl.Int64,
    "cka": pl.Float64, "cka_debiased": pl.Float64, "subspace_similarity": pl.Float64, "n_samples": pl.Int64,
    **PROVENANCE_SCHEMA,
}  # fmt: skip
# kNN rows of the pretrained model carry no epoch and no alpha (null)
KNN_SCHEMA: dict[str, Any] = {
    **POINT_SCHEMA, "model": pl.String, "layer": pl.Int64, "k": pl.Int64, "top1": pl.Float64, "top5": pl.Float64,
    "n_train": pl.Int64, "n_test": pl.Int64, **PROVENANCE_SCHEMA,
}  # fmt: skip
# columns that may be null in a complete shard (not defined there): subspace similarity of pairs of
# different layers, or of a model with itself; top-5 with fewer than 5 classes
NULLABLE_COLUMNS = frozenset({"subspace_similarity", "top5"})


def rows_frame(rows: Iterable[Mapping[str, Any]], schema: Schema) -> pl.DataFrame:
    """The frame of ``rows`` (dicts holding exactly the columns of ``schema``) with the types and
    column order of ``schema``, whatever the rows' values (all null in a column included).

    ValueError naming the columns where a row has a key that ``schema`` lacks or lacks one it
    names: a row kind and its schema changed apart."""
    rows = list(rows)
    names = set(schema)
    for row in rows:
        if row.keys() != names:
            extra, missing = sorted(row.keys() - names), sorted(names - row.keys())
            raise ValueError(f"a row does not match its schema: extra columns {extra}, missing columns {missing}")
    return pl.DataFrame(rows, schema=dict(schema))


def conform(frame: pl.DataFrame, schema: Schema) -> pl.DataFrame:
    """``frame`` (read from storage) with the columns of ``schema`` it lacks added as nulls of their
    type, and those it has cast to their type; columns ``schema`` does not name are kept after."""
    if frame.is_empty() and not frame.columns:
        return frame
    present = [name for name in schema if name in frame.columns]
    return frame.with_columns(
        *(pl.col(name).cast(schema[name]) for name in present),
        *(pl.lit(None, dtype=schema[name]).alias(name) for name in schema if name not in frame.columns),
    ).select(*schema, *(name for name in frame.columns if name not in schema))
