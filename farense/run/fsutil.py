"""Durable writes: fsync, atomic file replace, the atomic directory commit, hashing, sizes, disk-full.

Every file and directory farense must not lose goes through here, so the rules live in one place:
write beside, fsync, rename, fsync the parent; and never retry a failed fsync (on Linux the
failed pages are marked clean, so a second fsync reports success for data that is gone).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import stat
import sys
import types
import typing
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from farense.run.layout import MANIFEST_NAME, TMP_MARK

CHUNK_SIZE = 1 << 20  # 1 MiB: large enough to hash at disk speed, small enough to stream
# Free space under which a writer's failure that carries no errno (mx.save_safetensors raises a
# plain RuntimeError "[write] Unable to write N bytes") is taken for a full disk.
NO_ERRNO_DISK_FULL_BYTES = 1 << 20
DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EIO) if code is not None
)

if sys.platform == "darwin":  # pragma: no cover - exercised on macOS only
    import fcntl

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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` so a reader sees the old file or the new one, never a mix.

    On any error the temporary file is removed and the error re-raised; the fsync is never retried.
    `durable=False` skips the fsyncs: for files rewritten every step that resume never reads.
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
            if durable:
                _flush_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        replaced = True
        if durable:
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


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A JSON object from a file farense wrote; None when the file is missing, unreadable or not an object."""
    try:
        data = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


class JsonRecord:
    """A dataclass kept as one JSON object in a file: written atomically, read back tolerating unknown keys."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Any:
        """Unknown keys, and values not of their field's type (a damaged file), are left out: the defaults stand."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known and _fits(v, hints.get(k, Any))})

    def write(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Any:
        """The record at `path`; None when there is none (missing, unreadable, not a JSON object)."""
        data = read_json_object(path)
        return cls.from_json(data) if data is not None else None


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value has a declared field type (None only where the type allows it; a bool is no number)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_fits(value, arg) for arg in typing.get_args(tp))
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    tp = origin or tp
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so multi-GB files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK_SIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _tree_stats(path: str | os.PathLike[str]) -> Iterator[os.stat_result]:
    """The lstat of `path` and of everything under it (symlinks not followed); tolerates entries vanishing
    while it walks (a concurrent prune), since callers only size things."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    yield st
    if not stat.S_ISDIR(st.st_mode):
        return
    stack = [os.fspath(path)]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        yield entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue


def dir_size(path: str | os.PathLike[str]) -> int:
    """Bytes of the regular files under `path` (symlinks not followed); 0 if it is gone."""
    return sum(st.st_size for st in _tree_stats(path) if stat.S_ISREG(st.st_mode))


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    """What deleting `path` frees on its filesystem: the blocks allocated to it and everything under it
    (st_blocks * 512, each inode once, directories included); 0 if it is gone. A file with hard links
    outside `path` frees nothing, so it is not counted."""
    seen: dict[tuple[int, int], list[int]] = {}  # inode -> [links found here, links it has, bytes]
    for st in _tree_stats(path):
        key = (st.st_dev, st.st_ino)
        found = seen.setdefault(key, [0, 1 if stat.S_ISDIR(st.st_mode) else st.st_nlink, st.st_blocks * 512])
        found[0] += 1
    return sum(size for here, links, size in seen.values() if here >= links)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Space a non-root writer may still use on `path`'s filesystem (statvfs f_bavail)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def existing_path(path: str | os.PathLike[str]) -> Path:
    """`path` or its nearest existing ancestor: where a path not created yet will live."""
    p = Path(os.path.abspath(path))
    while not _exists(p) and p != p.parent:
        p = p.parent
    return p


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a component too long (ENAMETOOLONG): that path cannot exist
        return False


def write_problem(directory: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """Where and why a file cannot be written in `directory` (or, while it does not exist, in the ancestor
    it would be created in): a real probe (create, fsync, delete a temporary file), since mode bits lie
    to root and to read-only mounts. None when the probe succeeds, or fails only for lack of space (the
    disk checks report that)."""
    where = existing_path(directory)
    if not where.is_dir():
        return where, "not a directory"
    probe = where / f".farense-write-probe{TMP_MARK}{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _flush_fd(fd)
        finally:
            os.close(fd)
            try:
                os.unlink(probe)
            except FileNotFoundError:  # a sweep of temporary files (another rank's resume) took it: it was written
                pass
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            return None
        return where, {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                       errno.EPERM: "operation not permitted"}.get(e.errno or 0, e.strerror or str(e))
    return None


def disk_full_errno(exc: BaseException) -> int | None:
    """ENOSPC, EDQUOT or EIO found in `exc` or the exceptions it was raised from; None otherwise."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def is_disk_full_error(exc: BaseException, where: str | os.PathLike[str] | None = None) -> bool:
    """True when `exc` means "stop now, resumable": the one test of a full disk in farense.

    ENOSPC, EDQUOT and EIO: the write did not reach the disk; retrying an fsync would lie. With
    `where` (for writers whose errors carry no errno), also when under 1 MiB is left there.
    """
    if disk_full_errno(exc) is not None:
        return True
    if where is None:
        return False
    try:
        return free_bytes(where) < NO_ERRNO_DISK_FULL_BYTES
    except OSError:
        return False


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (the directories after what they hold)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(dirpath)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A new temporary directory beside `final` to build it in; removed on the way out unless committed."""
    tmp = tmp_sibling(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after commit_dir there is nothing left to remove


def commit_dir(tmp: Path, final: Path, *, replace: bool = False, synced: bool = False,
               manifest: Callable[[Path], object] | None = None,
               before_rename: Callable[[], None] | None = None) -> None:
    """Put the directory built in `tmp` in place as `final`, whole or not at all (DESIGN.md, invariant 1).

    Every file is fsynced (unless the writer did: `synced`), `manifest(tmp)` writes the manifest last,
    the directory is fsynced, renamed to `final` and the parent fsynced. An existing `final` is an
    error, or with `replace` moved aside to a temporary name first and deleted after the rename
    (Linux has no portable atomic exchange of directories). A failure is never retried.
    """
    if not synced:
        fsync_tree(tmp)
    if manifest is not None:
        manifest(tmp)
    fsync_dir(tmp)
    if before_rename is not None:
        before_rename()
    old = None
    if os.path.lexists(final):
        if not replace:
            raise FileExistsError(errno.EEXIST, "already exists; not replacing it", str(final))
        old = tmp_sibling(final)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



def remove_atomically(path: Path, *, rename: Callable[[Path, Path], None] = os.rename,
                      ignore_errors: bool = False) -> bool:
    """Delete a file or directory so that no reader ever takes what is left for the real thing.

    Renamed to a temporary sibling first (never read; removed later if this is cut short), the
    parent fsynced, then removed. When even the rename needs space that a full disk cannot give (a
    longer name may need a new directory block), a directory is deleted in place, its manifest
    first. Returns False when `path` was already gone.
    """
    doomed = tmp_sibling(path)
    try:
        rename(path, doomed)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if not is_disk_full_error(exc) or not path.is_dir() or path.is_symlink():
            raise
        (path / MANIFEST_NAME).unlink(missing_ok=True)
        fsync_dir(path)
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return True
    fsync_dir(path.parent)
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed, ignore_errors=ignore_errors)
    else:
        doomed.unlink()
    return True
