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
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from invariance.errors import StorageError
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
        self._lost = threading.Event()
        self._renewer: threading.Thread | None = None
        self._renewed_at = 0.0

    def current(self) -> LeaseHolder | None:
        """The live holder of the lease, or None when it is free or lapsed."""
        try:
            record = LeaseHolder(**json.loads(self.store.get(self.key)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:  # not JSON, or not a lease record
            raise StorageError(
                f"{self.store.url(self.key)}: not a lease record ({exc}); delete it if no run of these settings is live"
            ) from exc
        if record.expires_at <= time.time() or _died_here(record):
            return None
        return record

    def _write(self) -> None:
        record = LeaseHolder(self.holder, socket.gethostname(), os.getpid(), self.started_at, time.time() + self.ttl_seconds)
        self.store.put(self.key, json.dumps(record.__dict__).encode())
        self._renewed_at = time.monotonic()

    @property
    def lost(self) -> bool:
        """True once another run holds the lease, or no renewal has landed for 3/4 of its TTL
        (a hanging write included): past that, a starter may find the record lapsed."""
        if self._lost.is_set():
            return True
        held = self._renewer is not None and not self._stop.is_set()
        return held and time.monotonic() - self._renewed_at > 0.75 * self.ttl_seconds

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
        """Every TTL/4: if the record is still ours (or lapsed, unclaimed), write it again. A
        failed write is retried at the next beat. Lost for good once another holder's record is
        there, or failures have left the record unrenewed for a whole TTL (``lost`` also reports
        a renewal overdue by 3/4 of the TTL while it is overdue)."""
        while not self._stop.wait(self.ttl_seconds / 4):
            try:
                other = self.current()
                if other is not None and other.holder != self.holder:
                    self._lost.set()
                    print(f"invariance: lost the run lease to {other.describe()}", file=sys.stderr)
                    return
                if self._stop.is_set():  # released meanwhile: a late write would bring the record back
                    return
                self._write()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup must not end the renewals
                print(f"invariance: could not renew the run lease ({type(exc).__name__}: {exc}); retrying",
                      file=sys.stderr)  # fmt: skip
                if time.monotonic() - self._renewed_at > self.ttl_seconds:
                    self._lost.set()

    def release(self) -> None:
        """Stop renewing and remove our record (a failure only warns: the record lapses anyway)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=60)  # a write in flight lands before the record is removed
        try:
            current = self.current()
            if current is not None and current.holder == self.holder:
                self.store.fs.rm_file(self.store.path(self.key))
        except Exception as exc:  # noqa: BLE001
            print(f"invariance: could not remove the run lease {self.store.url(self.key)} ({exc}); "
                  f"it lapses in {self.ttl_seconds:.0f} s", file=sys.stderr)  # fmt: skip
