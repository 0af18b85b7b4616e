"""Compaction: once every planned shard of a data folder (a measure's settings, run and epoch) is
complete, its shards become one write-once Parquet file in that folder (``compacted-<hash>.parquet``,
a row group per shard, ``invariance.io.compacted``), and the raw shards are removed, or kept under
``_raw/`` (``compaction.keep_raw``). Completion records stay: a unit is done when its record exists
and a raw shard or a compacted file holds its rows (``Plan.refresh``).

Safe to stop anywhere, and to repeat: the compacted file is written in one put before any raw shard
is removed, so a crash leaves every row in a raw shard or in the file (the reducer reads the file
then, ignoring raw shards it holds); the next compaction removes what is left. Two compactions of
one folder write the same key with the same rows. A run compacts under its lease.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Callable

import polars as pl

from invariance.engine.plan import Plan
from invariance.errors import StorageError
from invariance.io.compacted import compacted_bytes, compacted_members, member_rows
from invariance.io.layout import MANIFESTS, Unit, compacted_key, compaction_record_key, is_compacted, raw_archive_key
from invariance.io.storage import Store

log = logging.getLogger(__name__)
FOLDER_BATCH = 32  # folders whose shards are fetched at once (their bytes held until written)


@dataclass
class CompactionSummary:
    """What a compaction did: folders compacted, raw shards they held, bytes before and after."""

    groups: int = 0
    shards: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    removed: int = 0  # raw shards and superseded compacted files (and their records) removed, earlier ones' leftovers included
    seconds: float = 0.0

    def describe(self) -> str:
        if not self.groups and not self.removed:
            return "compaction: nothing new to compact"
        size = f" ({self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB)" if self.groups else ""
        return (f"compaction: {self.shards} shards of {self.groups} folders into {self.groups} files{size}, "
                f"{self.removed} raw files removed, in {self.seconds:.1f} s")  # fmt: skip


@dataclass
class _Folder:
    folder: str
    target: str  # the compacted file's key
    names: list[str]  # its shards' file names, in row order
    sources: dict[str, str]  # {shard file name: the key its rows are read from}
    leftovers: list[str]  # raw shards and superseded compacted files to remove once the target exists
    records: list[str]  # the planned shards' completion records: kept in the target's record, then removed


def _pending(plan: Plan, store: Store) -> list[_Folder]:
    """Every folder whose planned shards are all done and that is not yet one file holding them:
    its target, where each shard's rows are read, what to remove afterwards. Shards that a
    folder's older compacted file holds beyond the plan's (a weight-path point no longer
    configured) are carried into the new file: no row is lost, none is left in two files."""
    pending = []
    for folder, units, files in _unsettled(plan):
        sources = {posixpath.basename(plan.data_key(unit)): plan.source(unit) for unit in units}
        raw = sorted(plan.data_key(unit) for unit in units if plan.data_key(unit) in plan.present)
        for key in files:
            for name in compacted_members(store, key):
                sources.setdefault(name, key)
        names = sorted(sources)
        target = compacted_key(folder, names)
        records = sorted(plan.record_key(unit) for unit in units if plan.record_key(unit) in plan.records)
        superseded = [key for key in files if key != target]
        superseded += [compaction_record_key(key) for key in superseded]
        pending.append(_Folder(folder, target, names, sources, raw + superseded, records))
    return pending


def _unsettled(plan: Plan) -> list[tuple[str, list[Unit], list[str]]]:
    """(folder, its planned shards, its compacted files) of every folder whose planned shards are
    all done but not held by one compacted file alone (raw shards, or several files). No I/O."""
    compacted: dict[str, list[str]] = {}
    for key in filter(is_compacted, plan.present):
        compacted.setdefault(posixpath.dirname(key), []).append(key)
    unsettled = []
    for folder, units in sorted(plan.folder_units().items()):
        if not all(plan.is_done(unit) for unit in units):
            continue
        files = sorted(compacted.get(folder, []))
        raw = any(plan.data_key(unit) in plan.present or plan.record_key(unit) in plan.records for unit in units)
        if not raw and len(files) == 1 and {plan.source(unit) for unit in units} == {files[0]}:
            continue  # one compacted file (with its record) holds them all, and no raw shard or record is left
        unsettled.append((folder, units, files))
    return unsettled


def compaction_pending(plan: Plan) -> list[str]:
    """The folders (data folders of complete shards) a compaction would write or clean up, from the
    plan's last listing: no read. A scheduler submits a run for them (an older output's first tick)."""
    return [folder for folder, _, _ in _unsettled(plan)]


def compact(plan: Plan, store: Store, keep_raw: bool = False, progress: Callable[[str], None] | None = None,
            stop: Callable[[], bool] | None = None) -> CompactionSummary:  # fmt: skip
    """Compact every complete folder of ``plan`` (refreshed) that is not one file yet; remove (or
    with ``keep_raw`` move under ``_raw/``) the raw shards of folders compacted now or by a
    compaction that stopped halfway. Stops between batches of folders when ``stop()`` (the run
    lost its lease). Returns what it did; ``plan`` knows where each shard is now, without a listing."""
    started = time.monotonic()
    summary = CompactionSummary()
    pending = _pending(plan, store)
    last_report = started
    for begin in range(0, len(pending), FOLDER_BATCH):
        if stop is not None and stop():
            log.warning("compaction stopped after %d of %d folders: the run lost its lease", begin, len(pending))
            break
        batch = pending[begin : begin + FOLDER_BATCH]
        try:
            blobs = _read_sources(store, batch, plan)
        except StorageError:  # a shard gone since the listing: another compaction of these folders ran meanwhile
            plan.refresh(store)
            batch = [folder for folder in _pending(plan, store) if folder.folder in {f.folder for f in batch}]
            blobs = _read_sources(store, batch, plan)
        for folder in batch:
            if folder.target not in plan.present:
                data = _compacted(folder, blobs, store)
                store.put(folder.target, data)
                plan.present.add(folder.target)
                summary.groups += 1
                summary.shards += len(folder.names)
                summary.bytes_before += sum(len(blobs[key]) for key in set(folder.sources.values()) if key in blobs)
                summary.bytes_after += len(data)
            record = compaction_record_key(folder.target)
            if record not in plan.records:  # written once its file is: the file counts from now on
                store.put(record, _record(folder, blobs))
                plan.records.add(record)
            _retire(store, folder, keep_raw, plan)
            summary.removed += len(folder.leftovers)
        now = time.monotonic()
        if progress is not None and now - last_report > 30:
            progress(f"compaction: {begin + len(batch)}/{len(pending)} folders")
            last_report = now
    summary.seconds = time.monotonic() - started
    return summary


def _read_sources(store: Store, folders: list[_Folder], plan: Plan) -> dict[str, bytes]:
    """{key: bytes} of every raw shard and compacted file the folders still to write read their rows
    from, and of the completion records the folders' records keep."""
    keys = {key for folder in folders if folder.target not in plan.present for key in folder.sources.values()}
    keys |= {key for folder in folders if compaction_record_key(folder.target) not in plan.records for key in folder.records}
    return store.get_many(sorted(keys))


def _record(folder: _Folder, blobs: dict[str, bytes]) -> bytes:
    """The compacted file's completion record: its key, its shards, and their own records as written."""
    shards = {}
    for key in folder.records:
        try:
            shards[posixpath.basename(key)] = json.loads(blobs[key])
        except ValueError:  # a record is not read to decide anything: kept as text
            shards[posixpath.basename(key)] = blobs[key].decode(errors="replace")
    return json.dumps({"compacted": folder.target, "shards": folder.names, "records": shards}, indent=1).encode()


def _compacted(folder: _Folder, blobs: dict[str, bytes], store: Store) -> bytes:
    """The compacted file of ``folder``: each shard's rows in name order, as its source holds them."""
    shards = []
    for name in folder.names:
        key = folder.sources[name]
        where = store.url(key)
        try:
            if is_compacted(key):
                rows = member_rows(blobs[key], {name}, where)
            else:
                rows = pl.read_parquet(blobs[key])
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - polars raises several types for a bad file
            raise StorageError(f"{where}: not a readable Parquet file ({type(exc).__name__}: {exc}); nothing of "
                               f"{store.url(folder.folder)} was compacted. Delete it and its completion record under "
                               "_manifests/ to recompute it") from exc  # fmt: skip
        shards.append((name, rows))
    return compacted_bytes(shards)


def _retire(store: Store, folder: _Folder, keep_raw: bool, plan: Plan) -> None:
    """Remove what ``folder``'s compacted file now holds: its raw shards (kept under ``_raw/`` with
    ``keep_raw``) and the older compacted files it carried."""
    if keep_raw:
        for key in folder.leftovers:
            if not is_compacted(key) and not key.startswith(f"{MANIFESTS}/"):  # a raw shard, not a superseded file's record
                store.copy(key, raw_archive_key(key))
    store.remove(folder.leftovers)
    plan.present.difference_update(folder.leftovers)
    plan.holder.update((f"{folder.folder}/{name}", folder.target) for name in folder.names)
    store.remove(folder.records)  # last: until here every shard is done by its raw file and record too
    plan.records.difference_update(folder.records)
