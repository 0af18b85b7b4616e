"""A finetuning run's per-epoch metrics (``metrics/epoch=NN.parquet`` beside its checkpoints),
as the analysis reads them: clean and corrupted test accuracy and loss per epoch."""

from __future__ import annotations

import re
from typing import Any

import polars as pl

from invariance.io.layout import FINETUNE_METRICS
from invariance.errors import StorageError
from invariance.io.storage import Store

# the run's own files: metrics/epoch=NN.parquet, directly in metrics/ (not a copy in a subfolder)
_METRICS_FILE = re.compile(rf"^{FINETUNE_METRICS}/epoch=(\d+)\.parquet$")


def read_run_metrics(output: str, storage_options: dict[str, Any] | None = None) -> pl.DataFrame | None:
    """Every ``metrics/epoch=NN.parquet`` of the run at ``output``, by epoch; None when there are none.

    Only files directly in ``metrics/`` named ``epoch=NN.parquet`` are the run's: copies in a
    subfolder (``metrics/old/``) or under other names are left out, since counted with the rest
    they would count an epoch twice. Raises StorageError naming the files when two of them hold
    one epoch (``epoch=3.parquet`` beside ``epoch=03.parquet``), naming the file when one cannot
    be read, or the folder when its files have no ``epoch`` column."""
    store = Store(output, dict(storage_options or {}))
    by_epoch: dict[int, list[str]] = {}
    for key in store.list(FINETUNE_METRICS):
        match = _METRICS_FILE.match(key)
        if match:
            by_epoch.setdefault(int(match.group(1)), []).append(key)
    if not by_epoch:
        return None
    twice = {epoch: keys for epoch, keys in sorted(by_epoch.items()) if len(keys) > 1}
    if twice:
        listed = "; ".join(f"epoch {epoch} in {', '.join(store.url(key) for key in keys)}" for epoch, keys in twice.items())
        raise StorageError(f"{store.url(FINETUNE_METRICS)}: more than one metrics file of an epoch ({listed}); "
                           "keep one file per epoch (move the others out of the run's folder)")  # fmt: skip
    keys = [keys[0] for _, keys in sorted(by_epoch.items())]
    frame = store.read_parquet(keys, how="diagonal_relaxed")
    if "epoch" not in frame.columns:
        raise StorageError(f"{store.url(FINETUNE_METRICS)}: not finetuning metrics (no 'epoch' column; columns: {frame.columns})")
    return frame.sort("epoch")


def metrics_fingerprint(output: str, storage_options: dict[str, Any] | None = None) -> str:
    """A hash of the listing of the run's ``metrics/`` folder (names, sizes, modification times or
    ETags: one listing, no file read): it changes when a metrics file is added or rewritten."""
    import hashlib

    store = Store(output, dict(storage_options or {}))
    try:
        found = store.fs.find(store.path(FINETUNE_METRICS), detail=True)
    except FileNotFoundError:
        return ""
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot list {store.url(FINETUNE_METRICS)}: {type(exc).__name__}: {exc}") from exc
    entries = sorted(f"{name}|{info.get('size')}|{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"
                     for name, info in found.items())  # fmt: skip
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16] if entries else ""
