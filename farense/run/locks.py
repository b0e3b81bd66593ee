"""The one lock helper (fcntl.flock), and a way to ask who holds a lock.

One live process per run, per production directory, per demo build or model import, and one
training per machine all use RunLock.

A run is locked with `fcntl.flock` on `<run>/run.lock` (layout.RunPaths.lock). The kernel drops a
flock when its holder exits for any reason, SIGKILL included, so the lock never goes stale the way a
PID file does; the JSON written into the file ({pid, host, started_at, command}) only names the
holder for messages. A record left in a file whose flock is free is the trace of a holder that died
without releasing it ("stale"): it blocks nothing.

flock belongs to an open file description, not to a process: a second open() of the same file in
the holder's own process conflicts with the lock like any other process would (so probing from the
holder reports "held"), while a *forked* child shares the description and keeps the lock alive after
its parent dies. Descriptors here are opened non-inheritable, so exec'd children never hold it.
On NFS flock is emulated with POSIX locks or not at all: keep run directories on a local disk.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson

from farense.errors import RunLocked
from farense.run.fsutil import is_disk_full_error

# Probes hold a shared flock for microseconds; an acquirer that meets one retries this long.
DEFAULT_ACQUIRE_TIMEOUT = 0.5
_POLL_SECONDS = 0.02
_WOULD_BLOCK = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


@dataclass(frozen=True)
class LockInfo:
    """What a probe found: whether a live process holds the lock, and who wrote the record."""

    path: Path
    held: bool
    pid: int | None = None
    host: str | None = None
    since: float | None = None  # Unix seconds the holder acquired it
    command: str | None = None
    stale: bool = False  # a record is there but nobody holds the flock: its writer died

    def describe(self) -> str:
        """'pid 123 on host since 2024-05-01T10:00:00Z (train)', for messages."""
        who = f"pid {self.pid}" if self.pid is not None else "an unknown process"
        if self.host:
            who += f" on {self.host}"
        if self.since is not None:
            who += f" since {_iso(self.since)}"
        if self.command:
            who += f" ({self.command})"
        return who


def read_lock_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON a holder wrote into the lock file; {} when absent, empty or unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return {}
    if not data.strip():
        return {}
    try:
        rec = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return rec if isinstance(rec, dict) else {}


def probe_lock(path: str | os.PathLike[str]) -> LockInfo:
    """Is the lock at `path` held by a live process? Never creates the file, never blocks.

    Takes a shared flock for an instant: it succeeds only when no exclusive holder exists.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return LockInfo(path=path, held=False)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _WOULD_BLOCK:
                raise
            held = True
        else:
            held = False
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    rec = read_lock_record(path)
    return _info(path, rec, held=held)


class RunLock:
    """Exclusive lock of one file; a context manager.

    Raises errors.RunLocked naming the holder (pid, host, since, command) when another live process
    holds it: `busy(info)` words that message (default: a run in use). `timeout` only rides out a
    concurrent probe or a cleanup finishing; None waits for as long as it takes, polling every
    `poll` seconds and telling `on_wait(info)` once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        command: str = "",
        timeout: float | None = DEFAULT_ACQUIRE_TIMEOUT,
        poll: float = _POLL_SECONDS,
        on_wait: Callable[[LockInfo], None] | None = None,
        busy: Callable[[LockInfo], str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.command = command
        self.timeout = timeout
        self.poll = poll
        self.on_wait = on_wait
        self.busy = busy or self._run_in_use
        self._clock = clock
        self._fd: int | None = None

    def _run_in_use(self, info: LockInfo) -> str:
        return (f"run {self.path.parent} is in use: {self.path} is locked by {info.describe()}. "
                "Wait for it to finish or stop that process; a lock whose holder died is "
                "released by the kernel and never blocks.")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock and record who holds it; RunLocked if a live process has it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this RunLock is already held")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + max(self.timeout, 0.0)
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in _WOULD_BLOCK:
                        raise
                    if deadline is not None and time.monotonic() >= deadline:
                        raise RunLocked(self.busy(_info(self.path, read_lock_record(self.path), held=True))) from None
                    if self.on_wait is not None and not told:
                        self.on_wait(_info(self.path, read_lock_record(self.path), held=True))
                        told = True
                    time.sleep(self.poll)
            now = self._clock()
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": now,
                "started_at_utc": _iso(now),
                "command": self.command,
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, orjson.dumps(record) + b"\n", 0)
            except OSError as exc:
                # On a full disk the record cannot be written; the flock holds all the same, and
                # cleanup (which takes this lock) must still be able to free space.
                if not is_disk_full_error(exc):
                    raise
        except BaseException:
            os.close(fd)  # closing drops the flock if we got it
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the record (while still holding the lock, so a successor's record is never wiped)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the record only names the holder; the flock below is what matters
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held})"


def _info(path: Path, rec: dict[str, Any], *, held: bool) -> LockInfo:
    pid = rec.get("pid")
    since = rec.get("started_at")
    return LockInfo(
        path=path,
        held=held,
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        host=rec.get("host") if isinstance(rec.get("host"), str) else None,
        since=float(since) if isinstance(since, (int, float)) and not isinstance(since, bool) else None,
        command=rec.get("command") if isinstance(rec.get("command"), str) else None,
        stale=not held and bool(rec),
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
