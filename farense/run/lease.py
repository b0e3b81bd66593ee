"""One trainer per run across machines: a lease object on the store, taken and renewed with conditional puts.

    <run prefix>/LEASE.json   {"holder": {host, pid, run, started}, "token", "renewed_at", "expires_at", ...}

Created with If-None-Match; renewed, released and taken over with If-Match on the ETag read, so of
racing writers exactly one wins. Every write changes the content (token, time, counter): S3 ETags of
single-part objects are the MD5 of the content, and an unchanged ETag would let a stale If-Match pass.
Expiry is wall-clock seconds: the machines' clocks must agree to well within the TTL.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Self

import orjson

from farense.errors import RunLocked
from farense.run.objectstore import ObjectStore, PreconditionFailed, RemoteStoreError

log = logging.getLogger(__name__)

LEASE_NAME = "LEASE.json"
LEASE_FORMAT = "farense-lease"


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a run: enough for a person to find the process (host, pid) and what it runs."""

    host: str
    pid: int
    run: str
    started: float

    @classmethod
    def this_process(cls, run: str, now: Callable[[], float] = time.time) -> LeaseHolder:
        return cls(host=socket.gethostname(), pid=os.getpid(), run=run, started=now())


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object's content."""

    holder: LeaseHolder
    token: str  # one per RunLease: tells our own lease from another process's on the same host and pid
    renewed_at: float
    expires_at: float
    renewals: int = 0
    released: bool = False

    def live(self, now: float) -> bool:
        """Held by someone right now: not released and not expired."""
        return not self.released and now < self.expires_at

    def to_bytes(self) -> bytes:
        body = {"format": LEASE_FORMAT, **asdict(self),
                "expires_at_utc": datetime.fromtimestamp(self.expires_at, timezone.utc).isoformat()}
        return orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None when the object is not a lease farense wrote (treated as expired)."""
        try:
            raw: Any = orjson.loads(data)
            holder = LeaseHolder(**{k: raw["holder"][k] for k in ("host", "pid", "run", "started")})
            return cls(holder=holder, token=str(raw["token"]), renewed_at=float(raw["renewed_at"]),
                       expires_at=float(raw["expires_at"]), renewals=int(raw.get("renewals", 0)),
                       released=bool(raw.get("released", False)))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


class RunLease:
    """The lease of one run for this process: acquire, keep renewed in a thread, release.

    `lost` turns True (and `on_lost(reason)` is called once) when another process took the lease
    over or renewals failed until it expired: the trainer must then stop as preempted.
    """

    def __init__(self, store: ObjectStore, key: str, holder: LeaseHolder, *, ttl_s: float = 60.0,
                 now: Callable[[], float] = time.time, on_lost: Callable[[str], None] | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s: expected seconds > 0, got {ttl_s!r}")
        self.store, self.key, self.holder, self.ttl_s = store, key, holder, ttl_s
        self.token = uuid.uuid4().hex
        self._now, self._on_lost = now, on_lost
        self._record: LeaseRecord | None = None
        self._etag: str | None = None
        self._lost_reason: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """We acquired it and have not lost or released it."""
        return self._record is not None and self._lost_reason is None

    @property
    def lost(self) -> bool:
        return self._lost_reason is not None

    @property
    def lost_reason(self) -> str | None:
        return self._lost_reason

    @property
    def expires_at(self) -> float | None:
        return self._record.expires_at if self._record is not None else None

    def read(self) -> tuple[LeaseRecord | None, str] | None:
        """(record or None if unreadable, ETag) of the lease on the store; None when there is none."""
        found = self.store.get(self.key)
        return None if found is None else (LeaseRecord.from_bytes(found[0]), found[1])

    def acquire(self) -> LeaseRecord:
        """Take the lease: create it, or take over one released, expired or unreadable.

        Raises RunLocked (exit 73) naming the holder when another process holds it live.
        """
        for _ in range(5):  # each lost race means someone else wrote: look again
            now = self._now()
            mine = LeaseRecord(self.holder, self.token, renewed_at=now, expires_at=now + self.ttl_s)
            found = self.read()
            try:
                if found is None:
                    etag = self.store.put_if_absent(self.key, mine.to_bytes())
                else:
                    current, etag_seen = found
                    if current is not None and current.live(now) and current.token != self.token:
                        raise _locked(self.key, current, now)
                    etag = self.store.put_if_match(self.key, mine.to_bytes(), etag_seen)
                    _log_takeover(self.key, current, now)
            except PreconditionFailed:
                continue
            with self._lock:
                self._record, self._etag, self._lost_reason = mine, etag, None
            return mine
        raise RunLocked(f"could not take the lease {self.key}: other processes kept writing it; try again")

    def renew(self) -> bool:
        """Extend the lease by the TTL (If-Match on our ETag); False when it failed or the lease is lost."""
        lost = None
        with self._lock:
            if self._record is None or self._etag is None or self._lost_reason is not None:
                return False
            now = self._now()
            new = replace(self._record, renewed_at=now, expires_at=now + self.ttl_s,
                          renewals=self._record.renewals + 1)
            try:
                self._etag, self._record = self.store.put_if_match(self.key, new.to_bytes(), self._etag), new
                return True
            except PreconditionFailed:
                if self._still_ours():
                    return True
                lost = f"another process took over the lease {self.key}"
            except RemoteStoreError as exc:
                if now < self._record.expires_at:
                    log.warning("lease %s not renewed (%s); retrying until it expires in %.0f s",
                                self.key, exc, self._record.expires_at - now)
                    return False
                lost = f"could not renew the lease {self.key} before it expired: {exc}"
            self._lost_reason = lost
        self._stop.set()
        log.error("run lease lost: %s; this trainer must stop", lost)
        if self._on_lost is not None:
            self._on_lost(lost)  # outside the lock: the callback may ask this lease anything
        return False

    def _still_ours(self) -> bool:
        """After a 412: a write of ours may have landed although its answer was lost (a client retry)."""
        try:
            found = self.read()
        except RemoteStoreError:
            return False
        if found is None or found[0] is None or found[0].token != self.token or found[0].released:
            return False
        self._record, self._etag = found[0], found[1]
        return True

    def start_renewing(self, interval_s: float | None = None) -> None:
        """Renew in a daemon thread every `interval_s` (default TTL/3: two chances before expiry)."""
        if self._thread is not None:
            return
        interval = interval_s if interval_s is not None else self.ttl_s / 3
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, args=(interval,), name="farense-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.renew()
            if self.lost:
                return

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def release(self) -> None:
        """Stop renewing and mark the lease released (If-Match), so the next trainer need not wait for expiry."""
        self.stop_renewing()
        with self._lock:
            if self._record is None or self._etag is None or self._lost_reason is not None:
                return
            now = self._now()
            done = replace(self._record, released=True, renewed_at=now, expires_at=now)
            try:
                self.store.put_if_match(self.key, done.to_bytes(), self._etag)
            except RemoteStoreError as exc:  # PreconditionFailed too: it was no longer ours to release
                log.warning("could not release the lease %s (%s); it expires by itself", self.key, exc)
            self._record, self._etag = None, None

    def __enter__(self) -> Self:
        self.acquire()
        self.start_renewing()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _locked(key: str, current: LeaseRecord, now: float) -> RunLocked:
    h = current.holder
    until = datetime.fromtimestamp(current.expires_at, timezone.utc).isoformat(timespec="seconds")
    err = RunLocked(f"run {h.run!r} is held by host {h.host} pid {h.pid} (lease {key}, renewed "
                    f"{max(0.0, now - current.renewed_at):.0f} s ago, expires at {until}, in "
                    f"{current.expires_at - now:.0f} s); stop that trainer or wait for its lease to expire, then resume")
    err.holder = h  # type: ignore[attr-defined]
    err.expires_at = current.expires_at  # type: ignore[attr-defined]
    return err


def _log_takeover(key: str, previous: LeaseRecord | None, now: float) -> None:
    if previous is None:
        log.warning("lease %s was unreadable; taken over", key)
    elif not previous.released and previous.token:
        h = previous.holder
        log.warning("lease %s of host %s pid %s expired %.0f s ago; taken over", key, h.host, h.pid,
                    now - previous.expires_at)
