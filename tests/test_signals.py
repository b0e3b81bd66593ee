"""Signals (issue 13, item 9): SIGHUP preempts like SIGTERM (checkpoint, exit 75), and a Ctrl-C during
start-up always stops the run, also while MLX's first compile runs `g++ --version` through system(),
which ignores SIGINT in the caller for as long as the child runs. Real signals, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest
from training_fixtures import start_train, write_config_file

from farense.codes import ExitCode
from farense.run.checkpoint import CheckpointStore
from farense.run.layout import RunPaths
from farense.run.metrics import read_metrics
from farense.signals import PreemptionFlag

REPO = Path(__file__).resolve().parent.parent


def wait_for(cond, *, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the flag


def test_sighup_is_a_preemption_signal():
    caught: list[int] = []
    guard = signal.signal(signal.SIGHUP, lambda s, f: caught.append(s))  # pytest survives a flag without SIGHUP
    try:
        flag = PreemptionFlag().install()
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            assert flag.poll() and flag.signal == signal.SIGHUP and not caught
        finally:
            flag.restore()
        assert signal.getsignal(signal.SIGHUP) is not flag._handler
    finally:
        signal.signal(signal.SIGHUP, guard)


def test_a_sighup_ignored_by_nohup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        flag = PreemptionFlag().install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        flag.restore()
    finally:
        signal.signal(signal.SIGHUP, previous)


SYSTEM_WINDOW = textwrap.dedent("""
    import ctypes, signal, sys
    from farense.signals import PreemptionFlag

    flag = PreemptionFlag().install()
    if sys.argv[1] == "held":
        flag.hold()
    # What MLX's first compile does: system() ignores SIGINT in the caller while its child runs; the
    # child here sends the caller a SIGINT in that window (as a Ctrl-C would).
    ctypes.CDLL(None).system(b"kill -INT $PPID; sleep 0.1")
    print(flag.poll(), flag.signal)
""")


def _system_window(mode: str) -> str:
    r = subprocess.run([sys.executable, "-c", SYSTEM_WINDOW, mode], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_sigint_during_system_is_kept_while_held_and_lost_otherwise():
    assert _system_window("held") == f"True {int(signal.SIGINT)}"
    assert _system_window("not-held") == "False None", "the premise: system() drops a SIGINT that is not blocked"


# --------------------------------------------------------------------------- real trainings


def test_sighup_checkpoints_and_exits_75(tmp_path, make_config):
    cfg = make_config(workspace=tmp_path)
    cfg_file = write_config_file(cfg, tmp_path / "exp.toml")
    paths = RunPaths(cfg.run_dir)
    log = tmp_path / "log.txt"
    proc = start_train(cfg_file, tmp_path, log=log)
    wait_for(lambda: len(read_metrics(paths.metrics_jsonl)) >= 3, what="3 steps")
    proc.send_signal(signal.SIGHUP)  # the terminal or ssh session closed
    assert proc.wait(timeout=60) == ExitCode.PREEMPTED, log.read_text()[-3000:]
    last = read_metrics(paths.metrics_jsonl)[-1]["step"]
    assert CheckpointStore(paths.checkpoints).latest_verified().step == last
    state = orjson.loads(paths.state.read_bytes())
    assert state["state"] == "preempted" and f"signal {int(signal.SIGHUP)}" in state["message"]


def test_a_ctrl_c_during_mlx_first_compile_stops_the_run(tmp_path, make_config):
    """A g++ on PATH that announces itself and takes 2 s widens system()'s window so the SIGINT lands in it."""
    cfg = make_config(workspace=tmp_path)
    cfg_file = write_config_file(cfg, tmp_path / "exp.toml")
    paths = RunPaths(cfg.run_dir)
    bin_dir, marker = tmp_path / "bin", tmp_path / "gxx-running"
    bin_dir.mkdir()
    gxx = bin_dir / "g++"
    gxx.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 2\nexit 1\n")  # exit 1: no compiler, MLX does not JIT
    gxx.chmod(0o755)
    log = tmp_path / "log.txt"
    proc = start_train(cfg_file, tmp_path, log=log, PATH=f"{bin_dir}:{os.environ['PATH']}")
    try:
        wait_for(marker.exists, what="MLX's g++ probe")
        assert not paths.metrics_jsonl.exists() or not read_metrics(paths.metrics_jsonl), "still in start-up"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == ExitCode.PREEMPTED, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = [r["step"] for r in read_metrics(paths.metrics_jsonl)]
    assert steps == [1], steps  # served at the first step boundary, checkpointed there
    assert CheckpointStore(paths.checkpoints).latest_verified().step == 1
