"""A lease in the output store, so that scheduled reruns of one config never overlap.

Object stores have no locks: the lease is a small JSON record with a holder id and an
expiry that the holder renews while it works. A starter writes its record, waits a moment,
and reads it back; whoever's record is there holds the lease. A crashed holder stops
renewing, and its lease lapses after ``ttl_seconds``; on the holder's own host, at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import Callable

from invariance.errors import StorageError
from invariance.io.layout import lease_key
from invariance.io.storage import Store

SETTLE_SECONDS = 1.0
log = logging.getLogger(__name__)


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

    @classmethod
    def from_json(cls, data: bytes) -> "LeaseHolder":
        """The record in ``data``; ValueError when it is not JSON or a field is missing or mistyped."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or set(raw) != {f.name for f in fields(cls)}:
            raise ValueError(f"expected the keys {[f.name for f in fields(cls)]}")
        types = {"holder": str, "host": str, "pid": int, "started_at": (int, float), "expires_at": (int, float)}
        for key, expected in types.items():
            if not isinstance(raw[key], expected) or isinstance(raw[key], bool):
                raise ValueError(f"{key} has the wrong type ({type(raw[key]).__name__})")
        return cls(**raw)


def _died_here(record: LeaseHolder) -> bool:
    """A holder on this host whose process is gone (a killed driver) holds nothing."""
    if record.host != socket.gethostname():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


class RunLease:
    """Holds the lease on ``settings_hash`` for one run; renews it in the background until released.

    ``clock`` (monotonic seconds) times the renewals, ``now`` (epoch seconds) stamps the
    records: both injectable, so that tests can step time instead of sleeping.
    """

    def __init__(
        self,
        store: Store,
        settings_hash: str,
        ttl_seconds: float = 180.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.key = lease_key(settings_hash)
        self.ttl_seconds = ttl_seconds
        self.holder = uuid.uuid4().hex[:12]
        self._clock, self._now = clock, now
        self.started_at = now()
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._renewer: threading.Thread | None = None
        self._held = False
        self._renewed_at = 0.0

    def current(self) -> LeaseHolder | None:
        """The live holder of the lease, or None when it is free or lapsed."""
        try:
            record = LeaseHolder.from_json(self.store.get(self.key))
        except FileNotFoundError:
            return None
        except ValueError as exc:  # not JSON, or not a lease record
            raise StorageError(
                f"{self.store.url(self.key)}: not a lease record ({exc}); delete it if no run of these settings is live"
            ) from exc
        if record.expires_at <= self._now() or _died_here(record):
            return None
        return record

    def _write(self) -> None:
        record = LeaseHolder(self.holder, socket.gethostname(), os.getpid(), self.started_at, self._now() + self.ttl_seconds)
        self.store.put(self.key, json.dumps(record.__dict__).encode())
        self._renewed_at = self._clock()

    @property
    def lost(self) -> bool:
        """True once another run holds the lease, or no renewal has landed for 3/4 of its TTL
        (a hanging write included): past that, a starter may find the record lapsed."""
        if self._lost.is_set():
            return True
        held = self._held and not self._stop.is_set()
        return held and self._clock() - self._renewed_at > 0.75 * self.ttl_seconds

    def acquire(self, renew_in_background: bool = True) -> LeaseHolder | None:
        """Take the lease; returns None on success, else the other live holder.

        Without ``renew_in_background`` the caller renews with ``renew_once``."""
        other = self.current()
        if other is not None and other.holder != self.holder:
            return other
        self._write()
        try:
            time.sleep(SETTLE_SECONDS)  # a starter that wrote just after us wins; we see its record
            winner = self.current()
        except BaseException:  # an interrupt in the settle wait: our record must not block the next run
            self.release()
            raise
        if winner is not None and winner.holder != self.holder:
            return winner
        self._held = True
        if renew_in_background:
            self._renewer = threading.Thread(target=self._renew, daemon=True, name="invariance-lease")
            self._renewer.start()
        return None

    def renew_once(self) -> bool:
        """One renewal beat: if the record is still ours (or lapsed, unclaimed), write it again.
        False, and lost for good, once another holder's record is there or the lease was
        already lost (never bring back a record that may have lapsed to another starter). A
        failed write is only logged: the next beat retries while the lease is not lost."""
        if self.lost:
            self._lost.set()
            return False
        try:
            other = self.current()
            if other is not None and other.holder != self.holder:
                self._lost.set()
                log.warning("invariance: lost the run lease to %s", other.describe())
                return False
            if self._stop.is_set():  # released meanwhile: a late write would bring the record back
                return False
            self._write()
        except Exception as exc:  # noqa: BLE001 - a storage hiccup must not end the renewals
            log.warning("invariance: could not renew the run lease (%s: %s); retrying", type(exc).__name__, exc)
        return True

    def _renew(self) -> None:
        """Every TTL/4, a renewal beat, until released or lost."""
        while not self._stop.wait(self.ttl_seconds / 4):
            if not self.renew_once():
                return

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
            log.warning("invariance: could not remove the run lease %s (%s); it lapses in %.0f s",
                        self.store.url(self.key), exc, self.ttl_seconds)  # fmt: skip
