"""farense.run.locks against real flock and real processes (a second process, SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from farense.errors import RunLocked
from farense.run.locks import RunLock, probe_lock, read_lock_record

HOLDER = textwrap.dedent(
    """
    import sys, time
    from farense.run.locks import RunLock
    lock = RunLock(sys.argv[1], command="holder").acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def start_holder(lock_path: Path) -> subprocess.Popen:
    """A real second process that holds the lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "locked", f"holder did not start: {line!r}"
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_probe_of_a_missing_lock_is_free_and_creates_nothing(tmp_path: Path) -> None:
    info = probe_lock(tmp_path / "run.lock")
    assert not info.held and not info.stale and info.pid is None
    assert not (tmp_path / "run.lock").exists()


def test_lock_records_the_holder_and_clears_the_record_on_release(tmp_path: Path) -> None:
    path = tmp_path / "run" / "run.lock"
    with RunLock(path, command="train", clock=lambda: 1_700_000_000.0) as lock:
        assert lock.held
        rec = read_lock_record(path)
        assert rec["pid"] == os.getpid() and rec["command"] == "train" and rec["started_at"] == 1_700_000_000.0
        # A probe from the holder's own process opens a new file description: it must see "held".
        info = probe_lock(path)
        assert info.held and info.pid == os.getpid() and not info.stale
        assert "2023-11-14T22:13:20Z" in info.describe()
    assert not lock.held
    assert read_lock_record(path) == {}
    assert probe_lock(path) == probe_lock(path)  # probing leaves no trace
    assert not probe_lock(path).held and not probe_lock(path).stale


def test_second_acquire_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    with RunLock(path, command="train"):
        with pytest.raises(RunLocked, match=rf"locked by pid {os.getpid()} on .* \(train\)"):
            RunLock(path, timeout=0).acquire()


def test_live_holder_in_another_process_blocks_and_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    proc = start_holder(path)
    try:
        info = probe_lock(path)
        assert info.held and info.pid == proc.pid and info.command == "holder"
        with pytest.raises(RunLocked) as err:
            RunLock(path, timeout=0.05).acquire()
        assert f"pid {proc.pid}" in str(err.value) and err.value.retryable
    finally:
        kill9(proc)


def test_holder_killed_by_sigkill_leaves_a_stale_record_that_blocks_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    proc = start_holder(path)
    kill9(proc)
    info = probe_lock(path)
    assert not info.held and info.stale and info.pid == proc.pid  # the dead holder's record
    with RunLock(path, command="cleanup", timeout=0):
        assert read_lock_record(path)["pid"] == os.getpid()


def test_probe_from_another_process_sees_our_lock(tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    code = "import sys; from farense.run.locks import probe_lock; i = probe_lock(sys.argv[1]); print(i.held, i.pid)"
    with RunLock(path):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", str(os.getpid())]
