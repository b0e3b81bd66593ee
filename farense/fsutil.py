"""Durable-write helpers: fsync, atomic replace, hashing and sizes.

Every file farense must not lose goes through here, so the rules live in one place:
write beside, fsync, rename, fsync the parent; and never retry a failed fsync (on Linux the
failed pages are marked clean, so a second fsync reports success for data that is gone).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import orjson

from farense.layout import TMP_MARK

CHUNK_SIZE = 1 << 20  # 1 MiB: large enough to hash at disk speed, small enough to stream
DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EIO) if code is not None
)

if sys.platform == "darwin":  # pragma: no cover - exercised on macOS only

    def _flush_fd(fd: int) -> None:
        # On macOS fsync() only hands data to the drive; F_FULLFSYNC asks it to reach the media.
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOTTY):
                raise
            os.fsync(fd)  # the filesystem has no F_FULLFSYNC: this is the first flush, not a retry

else:
    _flush_fd = os.fsync


def fsync_fd(fd: int) -> None:
    """Flush an open descriptor once (F_FULLFSYNC on macOS); a failure must not be retried."""
    _flush_fd(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data to stable storage; a failure propagates and must not be retried."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _flush_fd(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries, so a create or rename inside it survives a power loss."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        _flush_fd(fd)
    finally:
        os.close(fd)


def tmp_sibling(path: Path) -> Path:
    """A unique temporary name beside `path` (`<name>.tmp-<hex>`), never seen as the real thing."""
    return path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex}")


def write_new_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Create `path` (it must not exist) holding `data`, flushed: for files of a directory built aside."""
    with open(path, "xb") as f:
        f.write(data)
    fsync_file(path)


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Put the complete directory `tmp` at `final`, replacing what is there; the old one is deleted after.

    Linux has no portable atomic directory exchange: the old one moves aside (to a temporary name that
    never counts), the new one is renamed in, the parent is flushed, then the old one is deleted.
    """
    old = None
    if final.exists():
        old = tmp_sibling(final)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def exclusive_flock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive fcntl.flock on `path` (created if missing) while building something shared.

    The kernel releases a flock when its holder dies, even by SIGKILL: the lock never goes stale.
    """
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old file or the new one, never a mix.

    On any error the temporary file is removed and the error re-raised; the fsync is never retried.
    """
    path = Path(path)
    tmp = tmp_sibling(path)
    replaced = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            _flush_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        replaced = True
        fsync_dir(path.parent)
    except BaseException:
        if not replaced:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write `obj` as indented JSON (orjson), ending in a newline."""
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so multi-GB files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK_SIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def dir_size(path: str | os.PathLike[str]) -> int:
    """Bytes of the regular files under `path` (symlinks not followed); 0 if it is gone.

    Tolerates entries vanishing while it walks (a concurrent prune), since callers only size things.
    """
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    stack = [os.fspath(path)]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Space a non-root writer may still use on `path`'s filesystem (statvfs f_bavail)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_disk_full_error(exc: BaseException) -> bool:
    """True when `exc` (or an exception it was raised from) means "stop now, resumable".

    ENOSPC, EDQUOT and EIO: the write did not reach the disk; retrying an fsync would lie.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False

