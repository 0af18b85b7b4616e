"""A per-user cache of local files' content hashes, so that a plan does not read every checkpoint again.

The plan fingerprints every local checkpoint file by a hash of its bytes (``storage.fingerprint_file``,
up to CONTENT_HASH_LIMIT): at real sizes (64 MB to 1 GB) an hourly tick over 500 checkpoints would
read them all again. The cache keeps each hash under the file's absolute path with what ``os.stat``
says of it (device, inode, size, modification and change times in ns): a file whose stat is unchanged
is not read again; any write (or a replacement, a copy over it, a ``touch``) changes the stat and the
file is hashed anew. A hash is kept only when the file had not changed for SETTLED_NS before it was
read, so that a write within the filesystem's timestamp granularity cannot go unseen (git's
"racily clean" entries).

The file is ``$XDG_CACHE_HOME/invariance/file_fingerprints.json`` (default ``~/.cache``): written to
a temporary file and renamed over it (concurrent writers never leave half a file; the last one's
entries win, merged with what the file held when it wrote), ignored when unreadable or corrupt,
and not written at all where the folder is read-only (the files are then hashed every time).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

FINGERPRINT_CACHE_FILE = "file_fingerprints.json"
CACHE_FORMAT = 1
# entries kept at most (the least recently used dropped first): ~130 bytes each
CACHE_ENTRIES = 20_000
# a hash is kept only of a file unchanged for this long before it was read
SETTLED_NS = 2_000_000_000


def fingerprint_cache_path() -> Path:
    """``$XDG_CACHE_HOME/invariance`` (default ``~/.cache/invariance``)/file_fingerprints.json."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "invariance" / FINGERPRINT_CACHE_FILE


def stat_key(status: os.stat_result) -> list[int]:
    """What identifies one version of a file: device, inode, size, mtime and ctime (ns)."""
    return [status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]


def _read_entries(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


class FingerprintCache:
    """Content hashes of local files by path and stat: ``get`` before reading a file, ``put`` after
    hashing it, ``save`` once at the end (one read and at most one write of the cache file)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or fingerprint_cache_path()
        self._entries: dict[str, Any] | None = None  # read on the first get: never for a listing with no local file
        self._new: dict[str, list[Any]] = {}
        self._used: list[str] = []

    @property
    def entries(self) -> dict[str, Any]:
        if self._entries is None:
            self._entries = _read_entries(self.path)
        return self._entries

    def get(self, path: str, status: os.stat_result) -> str | None:
        """The hash kept for ``path`` if its stat is still ``status``, else None."""
        entry = self._new.get(path) or self.entries.get(path)
        if isinstance(entry, list) and len(entry) == 6 and entry[:5] == stat_key(status) and isinstance(entry[5], str):
            self._used.append(path)
            return entry[5]
        return None

    def put(self, path: str, status: os.stat_result, digest: str, read_at_ns: int) -> None:
        """Keeps ``digest`` of ``path`` as it was at ``status``, read from ``read_at_ns`` on, unless the
        file had changed less than SETTLED_NS before (a later write might leave the same times)."""
        if max(status.st_mtime_ns, status.st_ctime_ns) <= read_at_ns - SETTLED_NS:
            self._new[path] = [*stat_key(status), digest]

    def save(self) -> None:
        """Writes the new hashes (merged with the file as it is now) if there are any."""
        if not self._new:
            return
        entries = _read_entries(self.path)  # what other processes wrote since it was read
        for path in self._used:  # the entries used now last: the oldest are dropped first
            if path in entries:
                entries[path] = entries.pop(path)
        for path, entry in self._new.items():
            entries.pop(path, None)
            entries[path] = entry
        kept = dict(list(entries.items())[-CACHE_ENTRIES:])
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"format": CACHE_FORMAT, "entries": kept}, separators=(",", ":")))
            os.replace(partial, self.path)
        except OSError:  # unwritable: the files are hashed again next time
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass
        self._entries, self._new, self._used = kept, {}, []
