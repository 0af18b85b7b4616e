"""A finetuning run's per-epoch metrics (``metrics/epoch=NN.parquet`` beside its checkpoints),
as the analysis reads them: clean and corrupted test accuracy and loss per epoch."""

from __future__ import annotations

from typing import Any

import polars as pl

from invariance.io.layout import FINETUNE_METRICS
from invariance.errors import StorageError
from invariance.io.storage import Store


def read_run_metrics(output: str, storage_options: dict[str, Any] | None = None) -> pl.DataFrame | None:
    """Every ``metrics/epoch=NN.parquet`` of the run at ``output``, by epoch; None when there are none.

    Raises StorageError naming the file when one cannot be read, or the folder when its files
    have no ``epoch`` column."""
    store = Store(output, dict(storage_options or {}))
    keys = [key for key in store.list(FINETUNE_METRICS) if key.endswith(".parquet")]
    if not keys:
        return None
    frame = store.read_parquet(keys, how="diagonal_relaxed")
    if "epoch" not in frame.columns:
        raise StorageError(f"{store.url(FINETUNE_METRICS)}: not finetuning metrics (no 'epoch' column; columns: {frame.columns})")
    return frame.sort("epoch")
