"""farense.run.fsutil against real files, real fsync and (as root) a real full filesystem."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import orjson
import pytest

from farense.run import fsutil
from farense.run.layout import TMP_MARK


@pytest.fixture
def small_tmpfs(mount_tmpfs):
    """A 1m tmpfs, or a skip that says why there is none."""
    return mount_tmpfs("1m")


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if TMP_MARK in p.name]


def test_atomic_write_bytes_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    fsutil.atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    inode = target.stat().st_ino
    fsutil.atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert target.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert leftovers(tmp_path) == []


def test_atomic_write_readers_never_see_a_mix(tmp_path: Path) -> None:
    target = tmp_path / "blob"
    size = 1 << 20
    fsutil.atomic_write_bytes(target, b"a" * size)
    stop = threading.Event()
    bad: list[str] = []

    def read_loop() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if len(data) != size or data.count(data[:1]) != size:
                bad.append(f"len={len(data)} first={data[:1]!r}")

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for i in range(30):
            fsutil.atomic_write_bytes(target, (b"b" if i % 2 else b"c") * size)
    finally:
        stop.set()
        reader.join()
    assert bad == []
    assert leftovers(tmp_path) == []


def test_atomic_write_failure_leaves_no_tmp_and_keeps_the_old_file(tmp_path: Path) -> None:
    # os.replace of a file onto a non-empty directory fails (EISDIR/ENOTEMPTY): the rename step.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "inside").write_text("keep")
    with pytest.raises(OSError):
        fsutil.atomic_write_bytes(blocker, b"data")
    assert (blocker / "inside").read_text() == "keep"
    assert leftovers(tmp_path) == []

    # A failure while writing (not bytes): the tmp file is removed too.
    target = tmp_path / "f"
    fsutil.atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        fsutil.atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_atomic_write_on_a_full_disk(small_tmpfs: Path) -> None:
    target = small_tmpfs / "state.bin"
    fsutil.atomic_write_bytes(target, b"old")
    with pytest.raises(OSError) as info:
        fsutil.atomic_write_bytes(target, b"x" * (4 << 20))
    assert info.value.errno == errno.ENOSPC
    assert fsutil.is_disk_full_error(info.value)
    assert target.read_bytes() == b"old"
    assert leftovers(small_tmpfs) == []


def test_atomic_write_json_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    fsutil.atomic_write_json(target, {"b": [1, 2], "a": "é"})
    text = target.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\n  " in text  # indented for people
    assert orjson.loads(text) == {"b": [1, 2], "a": "é"}


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom(3 * fsutil.CHUNK_SIZE + 123)
    path = tmp_path / "big"
    path.write_bytes(data)
    assert fsutil.sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert fsutil.sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_dir_size_counts_files_and_does_not_follow_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "one").write_bytes(b"x" * 100)
    (root / "a" / "two").write_bytes(b"x" * 20)
    (root / "a" / "b" / "three").write_bytes(b"x" * 3)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "huge").write_bytes(b"x" * 10_000)
    (root / "link-dir").symlink_to(outside)
    (root / "link-file").symlink_to(outside / "huge")
    assert fsutil.dir_size(root) == 123
    assert fsutil.dir_size(root / "one") == 100
    assert fsutil.dir_size(tmp_path / "missing") == 0


def test_fsync_helpers_on_real_files(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"data")
    fsutil.fsync_file(f)
    fsutil.fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsutil.fsync_dir(tmp_path / "missing")
    assert fsutil.free_bytes(tmp_path) > 0


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError(errno.EIO, "Input/output error"), True),
        (OSError(errno.ENOENT, "No such file"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (ValueError("nope"), False),
    ],
)
def test_is_disk_full_error(exc: BaseException, expected: bool) -> None:
    assert fsutil.is_disk_full_error(exc) is expected


def test_is_disk_full_error_follows_the_cause() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as outer:
        assert fsutil.is_disk_full_error(outer)
