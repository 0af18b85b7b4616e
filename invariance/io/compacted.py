"""The compacted file of a data folder: the shards of a measure's run and epoch in one Parquet
file, one row group per shard (so that Polars prunes row groups on the shard's model, layer and
seed by their statistics), and in its key-value metadata which shards it holds, in row order.
Written once by ``invariance.engine.compact``; read here."""

from __future__ import annotations

import io
import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from invariance.errors import StorageError
from invariance.io.layout import COMPACTED_MEMBERS
from invariance.io.storage import Store, redact


def compacted_bytes(shards: list[tuple[str, pl.DataFrame]]) -> bytes:
    """One Parquet file of ``shards`` ([(shard file name, its rows)], in that order): a row group
    per shard, column statistics, the names and row counts in the metadata. Columns a shard lacks
    (an older release's) are null in its rows."""
    table = pl.concat([frame for _, frame in shards], how="diagonal_relaxed").to_arrow()
    members = [[name, frame.height] for name, frame in shards]
    table = table.replace_schema_metadata({COMPACTED_MEMBERS: json.dumps(members)})
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, table.schema, compression="zstd", write_statistics=True) as writer:
        offset = 0
        for _, rows in members:
            if rows:
                writer.write_table(table.slice(offset, rows), row_group_size=rows)
                offset += rows
    return buffer.getvalue()


def members_of(metadata: dict[bytes, bytes] | None, where: str) -> list[tuple[str, int]]:
    """[(shard file name, rows)] in row order, from a compacted file's key-value metadata."""
    try:
        return [(str(name), int(rows)) for name, rows in json.loads((metadata or {})[COMPACTED_MEMBERS.encode()])]
    except (KeyError, ValueError, TypeError) as exc:
        raise StorageError(f"{where}: a compacted file without its list of shards ({COMPACTED_MEMBERS}); "
                           "delete it and the next run computes its shards anew") from exc  # fmt: skip


def compacted_members(store: Store, key: str) -> list[str]:
    """The shard file names the compacted file at ``key`` holds, from its footer only."""
    try:
        with store.fs.open(store.path(key), "rb") as handle:
            metadata = pq.read_metadata(handle).metadata
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001 - every backend and pyarrow raise their own types
        raise StorageError(f"cannot read the footer of {store.url(key)}: {type(exc).__name__}: {redact(str(exc))}") from exc
    return [name for name, _ in members_of(metadata, store.url(key))]


def member_rows(data: bytes, names: set[str] | None, where: str) -> pl.DataFrame:
    """The rows of the shards ``names`` (all without) of the compacted file whose bytes are ``data``."""
    members = members_of(pq.read_schema(pa.BufferReader(data)).metadata, where)
    frame = pl.read_parquet(io.BytesIO(data))
    if names is None or {name for name, _ in members} <= names:
        return frame
    parts, offset = [], 0
    for name, rows in members:
        if name in names and rows:
            parts.append(frame.slice(offset, rows))
        offset += rows
    return pl.concat(parts) if parts else frame.clear()
