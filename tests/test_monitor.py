"""The monitor on a real run of the demo model: while it trains, after it ends, after a crash.

Snapshots are taken from inside the training (on_step_end) so that "while the run writes" is a real
state, the command is driven in a pseudo-terminal (rich) and through a pipe (key=value, JSON), and
the crash is a real process holding the run lock, killed with SIGKILL.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from farense.codes import RunState
from farense.config import config_to_json, load_config
from farense.observe.monitor import (
    MonitorSnapshot,
    parse_plain_line,
    plain_line,
    render_text,
    resolve_run_dir,
    snapshot,
    watch,
)
from farense.overfitting import GapStatus
from farense.run.layout import RunPaths
from farense.run.locks import LockInfo
from farense.run.runstate import effective_state, write_run_state

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
GAP_LABELS = {s.value for s in GapStatus}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    """A real 8-step run; snapshots taken at the start of steps 3 and 7, while it holds its lock."""
    from farense.train.runner import run_training

    ws = tmp_path_factory.mktemp("ws")
    cfg = load_config("v2", overlays=["tiny"], workspace=ws).with_overrides(
        model={"path": str(demo_dir / "model")}, data={"dir": str(demo_dir / "data")},
        training={"iters": 8, "warmup_steps": 2, "max_seq_length": 128, "batch_size": 2, "grad_accumulation": 2},
        validation={"every_steps": 2, "batches": 2}, checkpoint={"every_steps": 4, "keep_last": 2},
        output={"run_name": "watched"},
    )
    during: dict[int, MonitorSnapshot] = {}

    def look(step: int, row: dict, model: object) -> None:
        if step in (3, 7):  # called before step `step` is recorded: the files show step - 1
            during[step] = snapshot(cfg.run_dir)

    run_training(cfg, progress_bar=False, log=lambda m: None, on_step_end=look)
    return cfg, during


def test_snapshot_while_the_run_writes_has_every_field(trained):
    cfg, during = trained
    s = during[7]
    assert s.running and s.state == "running" and s.state_detail == f"running (pid {os.getpid()})"
    assert (s.step, s.total_steps, s.progress) == (6, 8, 6 / 8)
    assert s.seconds_per_step > 0 and s.eta_seconds == pytest.approx(2 * s.seconds_per_step)
    assert s.train_loss > 0 and s.train_loss_mean > 0 and s.train_trend in {"down", "up", "flat"}
    assert s.val_step == 6 and s.val_loss > 0 and s.val_trend in {"down", "up", "flat"}
    assert s.best_val_loss <= s.val_loss and s.best_step in (2, 4, 6)
    assert s.gap is not None and s.gap_status in GAP_LABELS
    assert s.learning_rate > 0 and s.tokens_per_second > 0 and s.peak_memory_gb > 0
    assert s.checkpoints == 1 and s.last_checkpoint_step == 4 and s.last_checkpoint_age_seconds >= 0
    assert s.disk_free_bytes > 0 and s.disk_level in {"ok", "low", "high", "flood"}
    assert s.patience == 5 and 0 <= s.patience_left <= 5
    assert s.config_name == "v2" and s.fingerprint == cfg.fingerprint
    early = during[3]
    assert early.step == 2 and early.checkpoints == 0 and early.val_trend is None

    text = render_text(s)
    for piece in ("farense monitor: watched", "running (pid", "6 / 8", "75.0%", "ETA", "train loss", "val loss",
                  s.gap_status, "learning rate", "tokens/s", "peak memory", "1 kept, last step 4", "watermark",
                  f"{s.patience_left} of 5 validations left"):
        assert piece in text, piece
    fields = parse_plain_line(plain_line(s))
    assert fields["state"] == "running" and fields["step"] == "6/8" and fields["gap_status"] == s.gap_status
    assert fields["patience_left"] == f"{s.patience_left}/5" and fields["checkpoints"] == "1"


def test_snapshot_of_the_finished_run_and_its_plot(trained):
    cfg, _ = trained
    s = snapshot(cfg.run_dir)
    assert s.state == "completed" and not s.running and s.state_detail == "completed"
    assert (s.step, s.progress, s.eta_seconds) == (8, 1.0, None)
    assert s.val_step == 8 and s.checkpoints >= 1 and s.last_checkpoint_step == 8
    summary = orjson.loads(RunPaths(cfg.run_dir).summary.read_bytes())
    assert s.best_val_loss == summary["best_val_loss"] and s.best_step == summary["best_step"]
    png = RunPaths(cfg.run_dir).plots / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the trainer draws the loss curves at the end"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}


def _as_from_a_shell() -> None:
    """Ctrl-C and Ctrl-\\ as a shell leaves them to a command it starts. This test's process may fork while
    MLX compiles in another of its threads through system(), which ignores SIGINT and SIGQUIT in the whole
    process meanwhile; a child forked then inherits both ignored (seen in the loaded suite: SigIgn 0x1001006)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _signal_state(pid: int) -> str:
    """The signal masks and each thread's wait channel of a live process, for a failure message."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        masks = [line for line in status if line.startswith(("State", "Threads", "SigPnd", "ShdPnd", "SigBlk",
                                                              "SigIgn", "SigCgt"))]
        waits = [Path(t, "wchan").read_text() for t in sorted(Path(f"/proc/{pid}/task").iterdir())]
        return "; ".join(masks) + f"; threads waiting in {waits}"
    except OSError as exc:
        return f"unreadable ({exc})"


def _read_pty(fd: int, proc: subprocess.Popen, deadline: float, until=None) -> str:
    """What the child wrote to the terminal until `deadline`, its exit, or `until(text so far)` holds."""
    chunks = []
    while time.monotonic() < deadline and not (until and until(b"".join(chunks).decode("utf-8", "replace"))):
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks).decode("utf-8", "replace")


def test_monitor_command_in_a_pseudo_terminal_draws_the_panel_and_refreshes(trained):
    cfg, _ = trained
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "farense", "monitor", str(cfg.run_dir)]
    proc = subprocess.Popen([*cmd, "--once"], stdin=slave, stdout=slave, stderr=slave, env=_env(), cwd=REPO)
    try:
        out = ANSI.sub("", _read_pty(master, proc, time.monotonic() + 60))
        assert proc.wait(30) == 0
    finally:
        os.close(slave)
    for piece in ("farense monitor: watched (v2)", "completed", "8 / 8", "100.0%", "━", "gap", "checkpoints",
                  "disk", "early stopping"):
        assert piece in out, (piece, out)

    # The live view: it redraws every --refresh seconds until interrupted, then exits cleanly.
    master2, slave2 = pty.openpty()
    proc = subprocess.Popen([*cmd, "--refresh", "0.2"], stdin=slave2, stdout=slave2, stderr=slave2, env=_env(),
                            cwd=REPO, preexec_fn=_as_from_a_shell)
    try:
        # The first frame whenever the process has started (slower on a loaded machine), then ~5 refreshes.
        first = _read_pty(master2, proc, time.monotonic() + 60,
                          until=lambda text: "farense monitor: watched" in ANSI.sub("", text))
        first += _read_pty(master2, proc, time.monotonic() + 1.0)
        proc.send_signal(signal.SIGINT)
        # Keep reading: a child whose terminal buffer is full blocks in its last redraw and never exits.
        _read_pty(master2, proc, time.monotonic() + 30)
        assert proc.poll() is not None, f"SIGINT unanswered for 30 s: {_signal_state(proc.pid)}"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:  # never left running after a failure
            proc.kill()
            proc.wait()
        os.close(slave2)
        os.close(master)
        os.close(master2)
    assert "farense monitor: watched" in ANSI.sub("", first)
    assert first.count("\x1b[") > 20, "a live display moves the cursor to redraw"


def test_monitor_command_off_a_terminal_prints_plain_lines_and_json(trained):
    cfg, _ = trained
    run = [sys.executable, "-m", "farense", "monitor", str(cfg.run_dir), "--once"]
    out = subprocess.run(run, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert out.returncode == 0 and "\x1b[" not in out.stdout and len(out.stdout.splitlines()) == 1
    fields = parse_plain_line(out.stdout)
    assert fields["run"] == "watched" and fields["state"] == "completed" and fields["step"] == "8/8"
    assert fields["gap_status"] in GAP_LABELS and fields["disk_level"] in {"ok", "low", "high", "flood"}
    js = subprocess.run([*run, "--json"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    doc = json.loads(js.stdout)
    assert doc["state"] == "completed" and doc["total_steps"] == 8 and doc["checkpoints"] >= 1


def test_watch_prints_one_line_per_refresh_off_a_terminal(trained):
    cfg, _ = trained
    out, slept = io.StringIO(), []
    assert watch(cfg.run_dir, refresh=5, out=out, tty=False, sleep=slept.append, max_refreshes=3) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and slept == [5, 5] and all(parse_plain_line(x)["run"] == "watched" for x in lines)


_HOLDER = """
import sys, time
from farense.run.locks import RunLock
from farense.run.runstate import write_run_state
from farense.codes import RunState
run = sys.argv[1]
with RunLock(run + "/run.lock", command="train"):
    write_run_state(__import__("pathlib").Path(run) / "run_state.json", RunState.RUNNING, step=3, total_steps=10)
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_killed_trainer_shows_as_crashed_with_its_dead_pid(tmp_path):
    run = tmp_path / "runs" / "killed"
    run.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "holding"
        live = snapshot(run)
        assert live.running and live.state_detail == f"running (pid {proc.pid})" and live.step == 3
    finally:
        proc.kill()
        proc.wait(30)
    dead = snapshot(run)
    assert dead.state == "crashed" and not dead.running and dead.eta_seconds is None
    assert dead.state_detail == f"crashed (pid {proc.pid} is dead)"
    assert "crashed (pid" in render_text(dead)
    assert parse_plain_line(plain_line(dead))["detail"] == f"crashed (pid {proc.pid} is dead)"


def _lock(held: bool, pid: int | None = None) -> LockInfo:
    return LockInfo(path=Path("run.lock"), held=held, pid=pid)


@pytest.mark.parametrize("doc,lock,alive,expected", [
    (None, _lock(False), True, ("not-started", "not started (no run_state.json yet)", False)),
    ({"state": "completed"}, _lock(True, 9), True, ("running", "running (pid 9, starting)", True)),
    ({"state": "running", "pid": 7}, _lock(False), False, ("crashed", "crashed (pid 7 is dead)", False)),
    ({"state": "running", "pid": 7}, _lock(False), True,
     ("crashed", "crashed (pid 7 is alive but does not hold the run lock)", False)),
    ({"state": "preempted"}, _lock(False), True, ("preempted", "preempted (resumable: run `farense train` again)", False)),
    ({"state": "paused-disk-full"}, _lock(False), True,
     ("paused-disk-full", "paused: disk full (resumable once space is freed)", False)),
    ({"state": "failed", "message": "NaN at step 3"}, _lock(False), True, ("failed", "failed: NaN at step 3", False)),
    ({"state": "early-stopped", "message": "early stop at step 40"}, _lock(False), True,
     ("early-stopped", "early-stopped: early stop at step 40", False)),
    ({"state": "completed"}, _lock(False), True, ("completed", "completed", False)),
])
def test_the_lock_decides_whether_a_run_is_running(doc, lock, alive, expected):
    if doc and doc.get("state") == "running":
        doc = {**doc, "host": "here"}
    assert effective_state(doc, lock, alive=lambda pid: alive, host="here") == expected


class _Usage:
    def __init__(self, total: int, free: int):
        self.total, self.free, self.used = total, free, total - free


def _fabricated_run(tmp_path: Path, name: str = "fab", steps: int = 30) -> Path:
    """A run's files without a training: config.json (v2 + demo), metrics, a state file."""
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    cfg = load_config("v2", overlays=["tiny"], workspace=tmp_path)
    (run / "config.json").write_bytes(config_to_json(cfg))
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "train_loss": 3.0 - step * 0.05, "learning_rate": 1e-4, "tokens": 100,
               "tokens_per_second": 500.0, "peak_memory_gb": 0.1, "elapsed_seconds": step * 2.0}
        if step % 10 == 0:
            row.update(val_loss=3.1 - step * 0.04, gap=0.1, gap_status="BOM", patience_left=5)
        rows.append(row)
    (run / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    write_run_state(run / "run_state.json", RunState.PREEMPTED, step=steps, total_steps=150)
    return run


@pytest.mark.parametrize("free_gb,level", [(3.0, "ok"), (1.5, "low"), (0.8, "high"), (0.4, "flood")])
def test_disk_watermark_level_follows_the_run_config(tmp_path, free_gb, level):
    run = _fabricated_run(tmp_path)
    s = snapshot(run, usage=lambda p: _Usage(4 * 10**9, int(free_gb * 10**9)))
    assert s.disk_level == level and s.disk_free_bytes == int(free_gb * 10**9)
    assert s.disk_used_percent == pytest.approx(100 * (4 - free_gb) / 4)
    assert s.state == "preempted" and s.eta_seconds is None and s.seconds_per_step == pytest.approx(2.0)
    assert (s.train_trend, s.val_trend, s.gap_status, s.patience_left) == ("down", "down", "BOM", 5)


def test_eta_uses_the_wall_clock_of_this_process_steps(tmp_path):
    run = _fabricated_run(tmp_path)
    rows = [orjson.loads(line) for line in (run / "metrics.jsonl").read_bytes().splitlines()]
    for r in rows:  # steps 1-10 by a process that crashed long ago; 11-30 after the resume, 3 s each
        r["timestamp"] = 100.0 * r["step"] if r["step"] <= 10 else 50_000.0 + 3.0 * r["step"]
    (run / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    write_run_state(run / "run_state.json", RunState.RUNNING, step=30, total_steps=150, resumed_from=10)
    s = snapshot(run, lock_probe=lambda p: LockInfo(path=p, held=True, pid=4242))
    assert s.running and s.state_detail == "running (pid 4242)"
    assert s.seconds_per_step == pytest.approx(3.0) and s.eta_seconds == pytest.approx(120 * 3.0)
    assert "ETA 6m00s" in render_text(s) and parse_plain_line(plain_line(s))["eta"] == "6m00s"


def test_torn_last_line_and_files_replaced_while_reading(tmp_path):
    run = _fabricated_run(tmp_path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 31, "train_lo')  # a writer killed mid-line
    assert snapshot(run).step == 30

    stop = threading.Event()
    data = (run / "metrics.jsonl").read_bytes()

    def churn() -> None:  # what a resume (metrics cut back) and every step (state replaced) do
        i = 0
        while not stop.is_set():
            tmp = run / "metrics.jsonl.tmp"
            tmp.write_bytes(data[: len(data) // 2 + (i % 7) * 13])
            os.replace(tmp, run / "metrics.jsonl")
            write_run_state(run / "run_state.json", RunState.RUNNING, step=i, total_steps=150)
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(100):
            s = snapshot(run)
            assert s.step >= 0 and s.state in ("crashed", "preempted")
    finally:
        stop.set()
        t.join()


def test_run_resolves_from_a_directory_a_config_name_or_the_latest_run(tmp_path, monkeypatch):
    a = _fabricated_run(tmp_path, "a")
    b = _fabricated_run(tmp_path, "demo-b")
    os.utime(a / "metrics.jsonl", (time.time() + 60, time.time() + 60))
    assert resolve_run_dir(None, runs_dir=tmp_path / "runs") == a.resolve()
    assert resolve_run_dir(str(b)) == b.resolve()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FARENSE_WORKSPACE", str(tmp_path))
    assert resolve_run_dir("v2", overlays=["tiny"], runs_dir=None) == tmp_path / "runs" / "tiny" / "v2"
    from farense.errors import FarenseError

    with pytest.raises(FarenseError, match="no runs under"):
        resolve_run_dir(None, runs_dir=tmp_path / "empty")
