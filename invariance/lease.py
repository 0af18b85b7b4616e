"""A lease in the output store, so that scheduled reruns of one config never overlap.

Object stores have no locks: the lease is a small JSON record with a holder id and an
expiry that the holder renews while it works. A starter writes its record, waits a moment,
and reads it back; whoever's record is there holds the lease. A crashed holder stops
renewing, and its lease lapses after ``ttl_seconds``; on the holder's own host, at once.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from invariance.layout import MANIFESTS
from invariance.storage import Store

SETTLE_SECONDS = 1.0


def lease_key(settings: str) -> str:
    return f"{MANIFESTS}/leases/settings={settings}.json"


@dataclass(frozen=True)
class LeaseHolder:
    holder: str
    host: str
    pid: int
    started_at: float
    expires_at: float

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        return f"{self.holder} on {self.host} (pid {self.pid}) since {started}"


def _died_here(record: LeaseHolder) -> bool:
    """A holder on this host whose process is gone (a killed driver) holds nothing."""
    if record.host != socket.gethostname():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunLease:
    """Holds the lease on ``settings`` for one run; renews it in the background until released."""

    def __init__(self, store: Store, settings: str, ttl_seconds: float = 180.0) -> None:
        self.store = store
        self.key = lease_key(settings)
        self.ttl_seconds = ttl_seconds
        self.holder = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def current(self) -> LeaseHolder | None:
        """The live holder of the lease, or None when it is free or lapsed."""
        try:
            record = LeaseHolder(**json.loads(self.store.get(self.key)))
        except FileNotFoundError:
            return None
        if record.expires_at <= time.time() or _died_here(record):
            return None
        return record

    def _write(self) -> None:
        record = LeaseHolder(self.holder, socket.gethostname(), os.getpid(), self.started_at, time.time() + self.ttl_seconds)
        self.store.put(self.key, json.dumps(record.__dict__).encode())

    def acquire(self) -> LeaseHolder | None:
        """Take the lease; returns None on success, else the other live holder."""
        other = self.current()
        if other is not None and other.holder != self.holder:
            return other
        self._write()
        time.sleep(SETTLE_SECONDS)  # a starter that wrote just after us wins; we see its record
        winner = self.current()
        if winner is not None and winner.holder != self.holder:
            return winner
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="invariance-lease")
        self._renewer.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 4):
            self._write()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        current = self.current()
        if current is not None and current.holder == self.holder:
            self.store.fs.rm_file(self.store.path(self.key))
