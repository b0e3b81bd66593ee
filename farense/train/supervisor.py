"""Training as a supervised child process: one training per machine, the trainer watched, its exit judged.

The trainer runs as `farense train ... --die-with-parent`, so killing the supervising process
(SIGKILL, out of memory) also ends the trainer and frees the run lock; the next attempt starts
`farense train` again and it resumes from the newest verified checkpoint. While it runs, its
metrics.jsonl, run_state.json and checkpoints are followed and reported through callbacks (the
Prefect task turns them into a progress artifact, log lines and events). No Prefect here.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

from farense.codes import ExitCode, RunState, explain_exit
from farense.config import ExperimentConfig, format_size
from farense.console import format_duration
from farense.errors import RunLocked, TrainingFailed
from farense.model.blas import thread_env
from farense.overfitting import GapReading
from farense.run.checkpoint import CheckpointStore
from farense.run.layout import RunPaths
from farense.run.locks import RunLock
from farense.run.metrics import MetricsTail
from farense.run.outcome import TrainingOutcome
from farense.run.runstate import read_run_state
from farense.run.summary import TrainingSummary
from farense.train.data import data_fingerprint
from farense.train.inputs import write_resolved_config

POLL_SECONDS = 2.0
MACHINE_LOCK_ENV = "FARENSE_TRAINING_LOCK"  # default ~/.farense/training.lock
OUTPUT_TAIL_LINES = 40  # trainer output kept for the failure message

Log = Callable[[str], None]


def already_trained(config: ExperimentConfig) -> TrainingOutcome | None:
    """The run's outcome, if this exact config (same fingerprint) already finished training on the
    same train/valid data (changed data means training again, which the trainer then refuses to
    resume into the old run: a person chooses --new-run)."""
    paths = RunPaths(config.run_dir)
    summary = TrainingSummary.read(paths.summary)
    if summary is None or summary.fingerprint != config.fingerprint or not summary.finished:
        return None
    if summary.data_fingerprint != data_fingerprint(config):
        return None
    return TrainingOutcome.from_summary(paths.root, summary, message="already trained with this config", skipped=True)


def training_lock_paths(slots: int = 1) -> list[Path]:
    """The machine's training slots: the lock file (FARENSE_TRAINING_LOCK, default ~/.farense/training.lock)
    for the first, `.1`, `.2`... beside it for the others."""
    first = Path(os.environ.get(MACHINE_LOCK_ENV) or Path.home() / ".farense" / "training.lock")
    return [first] + [first.with_name(f"{first.name}.{i}") for i in range(1, max(1, slots))]


@contextmanager
def one_training_on_this_machine(log: Log, run_name: str, *, slots: int = 1,
                                 poll: float = POLL_SECONDS) -> Iterator[None]:
    """Wait for, then hold, one of the machine's `slots` training locks (fcntl: the kernel frees it if we die).

    Prefect's deployment and queue limits keep a server's runs apart; this also keeps out a flow
    started without that server (`farense run`), so trainings never share memory or accelerator
    beyond what the caller allowed: `slots` > 1 only where trainings are meant to run side by side.
    """
    paths, told = training_lock_paths(slots), False
    while True:
        lock, holders = _free_training_slot(paths, f"train {run_name}")
        if lock is not None:
            break
        if not told:
            every = "every training slot is taken" if slots > 1 else "another training runs"
            log(f"waiting: {every} on this machine ({'; '.join(holders)})")
            told = True
        time.sleep(poll)
    try:
        yield
    finally:
        lock.release()


def _free_training_slot(paths: list[Path], command: str) -> tuple[RunLock | None, list[str]]:
    """The first slot nobody holds, taken; else None and who holds each."""
    holders = []
    for path in paths:
        try:
            return RunLock(path, command=command, timeout=0, busy=lambda info: info.describe()).acquire(), []
        except RunLocked as busy:
            holders.append(str(busy))
    return None, holders


def trainings_side_by_side(requested: int | str, configs: int, *, device: str, cores: int,
                            available_bytes: int | None = None, run_bytes: int | None = None) -> tuple[int, str]:
    """How many of a campaign's trainings run at once, and why. Side by side pays on a CPU: MLX's
    element-wise work there runs on one core, so two trainings with one core each finish sooner than
    one after the other with both (bench/bench_side_by_side.py). A GPU is one device: never shared.
    "auto": as many as there are configs, cores and memory for (`run_bytes` each)."""
    if requested != "auto" and (not str(requested).isdigit() or int(requested) < 1):
        raise ValueError(f"parallel: expected 'auto' or a whole number >= 1, got {requested!r}")
    if configs <= 1 or requested in (1, "1"):
        return 1, "one training at a time"
    if device != "cpu":
        return 1, f"one training at a time: on the {device} trainings side by side would share one device"
    if requested != "auto":
        n = min(int(requested), configs)
        return n, f"{n} trainings side by side (asked for), OPENBLAS_NUM_THREADS={max(1, cores // n)} each"
    n = min(configs, cores)
    why = f"{cores} cores, {configs} configs"
    if available_bytes is not None and run_bytes:
        n = min(n, max(1, available_bytes // run_bytes))
        why += f", memory for {available_bytes // run_bytes} trainings of {format_size(run_bytes)}"
    if n <= 1:
        return 1, f"one training at a time ({why})"
    return n, f"{n} trainings side by side (auto: {why}), OPENBLAS_NUM_THREADS={max(1, cores // n)} each"


def trainer_command(config: ExperimentConfig, result_json: Path) -> list[str]:
    """`python -m farense train` on this config exactly as the flow resolved it: its file in the run directory."""
    resolved = write_resolved_config(config)
    return [sys.executable, "-m", "farense", "--workspace", config.workspace, "train", str(resolved),
            "--result-json", str(result_json), "--die-with-parent", "--no-progress"]


# The progress bar moves when the run advanced PROGRESS_STEP_PERCENT and PROGRESS_MIN_SECONDS passed, or after
# PROGRESS_MAX_SECONDS whatever the advance (the ETA stays fresh on long runs), and at the end: a few dozen
# updates per run, not one per poll, so the event feed is not crowded.
PROGRESS_STEP_PERCENT = 5.0
PROGRESS_MIN_SECONDS = 10.0
PROGRESS_MAX_SECONDS = 300.0


def progress_due(percent: float, last_percent: float | None, since_last: float) -> bool:
    """Whether the progress bar should move now (see PROGRESS_STEP_PERCENT above)."""
    if last_percent is None or percent >= 100.0:
        return percent != last_percent
    if percent == last_percent:
        return False
    return ((percent - last_percent >= PROGRESS_STEP_PERCENT and since_last >= PROGRESS_MIN_SECONDS)
            or since_last >= PROGRESS_MAX_SECONDS)


def text_bar(percent: float, width: int = 10) -> str:
    """'▰▰▰▰▱▱▱▱▱▱ 40%': a bar that reads the same on an artifact card, in a log and in a notification."""
    full = min(width, max(0, int(percent / 100 * width + 1e-9)))
    return "▰" * full + "▱" * (width - full) + f" {percent:.0f}%"


def progress_description(step: int, total: int, last_val: dict, eta_seconds: float | None, state: str = "") -> str:
    """One line under the bar: a text bar, the step, the last validation's gap with its two losses, the ETA."""
    percent = 100.0 if state else 100.0 * min(step, total) / total
    parts = [text_bar(percent), f"{state + ' at ' if state else ''}step {step}/{total}"]
    reading = GapReading.of(last_val.get("val_loss"), last_val.get("train_loss_window"),
                            last_val.get("train_loss_window_steps"))
    if reading is not None:
        at = "" if last_val.get("step") == step else f"at step {last_val.get('step')}: "
        parts.append(f"{at}{reading.describe()} {last_val.get('gap_status') or ''}".rstrip())
    if eta_seconds is not None and not state and step < total:
        parts.append(f"ETA {format_duration(eta_seconds)}")
    return " · ".join(parts)


class TrainingWatcher:
    """Follows a run's metrics.jsonl, run_state.json and checkpoints while its trainer runs."""

    def __init__(self, paths: RunPaths, trainer_pid: int, log: Log, *,
                 on_checkpoint: Callable[[int], None] | None = None,
                 on_progress: Callable[[float, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.paths, self.trainer_pid, self.log, self.clock = paths, trainer_pid, log, clock
        self.started_at = time.time()
        self.on_checkpoint = on_checkpoint or (lambda step: None)
        self.on_progress = on_progress or (lambda percent, description: None)
        self.step = 0
        self.total: int | None = None
        self.resumed_from: int | None = None
        self.finished_as = ""  # the run state once the trainer stopped early or for good
        self.last: dict = {}
        self.last_val: dict = {}
        self._metrics = MetricsTail(paths.metrics_jsonl)
        self._store = CheckpointStore(paths.checkpoints)
        self._checkpoints: set[int] = set(self._store.committed_steps())
        self._reported: float | None = None
        self._reported_state = ""
        self._reported_at = clock()
        self._pace: tuple[float, int] | None = None  # (clock, step) when steps were first seen: the ETA's base

    def poll(self) -> None:
        state = read_run_state(self.paths.state) or {}
        # Ours: written by the trainer we started, or (a launched data-parallel job, where rank 0
        # is a grandchild) written since we started it.
        if state.get("pid") == self.trainer_pid or (state.get("updated_at") or 0) >= self.started_at:
            self.total = state.get("total_steps") or self.total
            if self.resumed_from is None and state.get("resumed_from"):
                self.resumed_from = int(state["resumed_from"])
                self.log(f"training resumed from checkpoint step {self.resumed_from}")
            if state.get("state") in (RunState.COMPLETED.value, RunState.EARLY_STOPPED.value):
                self.finished_as = state["state"]
        for row in self._metrics.new_rows():
            self.step = int(row.get("step", self.step))
            self.last = row
            if "val_loss" in row:
                self.last_val = row
        for step in sorted(set(self._store.committed_steps()) - self._checkpoints):
            self._checkpoints.add(step)
            self.on_checkpoint(step)
        self._report()

    def eta_seconds(self) -> float | None:
        """Remaining steps at the pace seen since this watcher first saw a step."""
        now = self.clock()
        if self._pace is None:
            self._pace = (now, self.step)
        t0, s0 = self._pace
        if not self.total or self.step <= s0:
            return None
        return (now - t0) / (self.step - s0) * max(self.total - self.step, 0)

    def _report(self) -> None:
        if not self.total:
            return
        # An early-stopped run is done: its bar ends full, and the description says where it stopped.
        pct = 100.0 if self.finished_as else round(100.0 * min(self.step, self.total) / self.total, 1)
        eta = self.eta_seconds()
        ended = self.finished_as and self.finished_as != self._reported_state  # said once, whatever the rate
        if not ended and not progress_due(pct, self._reported, self.clock() - self._reported_at):
            return
        self._reported, self._reported_at, self._reported_state = pct, self.clock(), self.finished_as
        self.on_progress(pct, progress_description(self.step, self.total, self.last_val, eta,
                                                   self.finished_as.replace("-", " ")))


def _forward_output(stream: IO[str], log: Log, tail: list[str]) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip()
        if line:
            tail.append(line)
            del tail[:-OUTPUT_TAIL_LINES]
            log(line)


def _supervise(argv: list[str], watcher_for: Callable[[int], TrainingWatcher], log: Log,
               keep_watching: Callable[[Callable[[], None]], None],
               env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run the trainer to its end, polling the watcher; on our own cancellation it checkpoints and stops."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    tail: list[str] = []
    reader = threading.Thread(target=_forward_output, args=(proc.stdout, log, tail), daemon=True)
    reader.start()
    watcher = watcher_for(proc.pid)
    try:
        while proc.poll() is None:
            keep_watching(watcher.poll)  # observability never stops training
            try:
                proc.wait(timeout=POLL_SECONDS)  # returns as soon as the trainer exits
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        proc.terminate()  # we are being cancelled: the trainer checkpoints and stops
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    reader.join(timeout=10)
    keep_watching(watcher.poll)
    return proc.returncode, tail


def judge_exit(code: int, result: TrainingOutcome | None, tail: list[str],
               free_disk_space: Callable[[], int]) -> TrainingFailed:
    """The error for a trainer that did not succeed, saying whether a retry can help.

    After a disk-full pause the cleanup policy runs at once: a retry helps only if it freed space.
    """
    detail = (result.message if result else "") or (tail[-1] if tail else "no output")
    freed = free_disk_space() if code == ExitCode.DISK_FULL else None
    message, can_retry = explain_exit(code, detail, bool(result and result.retryable), freed_bytes=freed)
    return TrainingFailed(message, code, can_retry)


def train_in_subprocess(config: ExperimentConfig, *, log: Log, error_log: Log,
                        free_disk_space: Callable[[], int],
                        watcher_for: Callable[[RunPaths, int], TrainingWatcher],
                        keep_watching: Callable[[Callable[[], None]], None] = lambda poll: poll(),
                        slots: int = 1) -> TrainingOutcome:
    """Train or resume `config` in a child process, one training per machine; skipped when already trained.

    `slots` > 1: this training runs beside up to slots - 1 others (a campaign's side-by-side runs), in
    one of that many machine slots, with its share of the cores (cores // slots BLAS threads).
    Returns the outcome (skipped=True when nothing ran); raises TrainingFailed (with `retryable`).
    """
    paths = RunPaths(config.run_dir)
    if (done := _skip_if_trained(config, log)) is not None:
        return done
    started = time.monotonic()
    with one_training_on_this_machine(log, paths.name, slots=slots), tempfile.TemporaryDirectory(prefix="farense-train-") as tmp:
        if (done := _skip_if_trained(config, log)) is not None:  # trained while we waited for the machine
            return done
        result_json = Path(tmp) / "result.json"
        argv = trainer_command(config, result_json)
        log("starting: " + shlex.join(argv))  # the interpreter too: which environment trains
        share = thread_env(slots)
        if share:
            log(f"side by side with up to {slots - 1} other training(s): its share of the cores, "
                f"OPENBLAS_NUM_THREADS={share['OPENBLAS_NUM_THREADS']}")
        code, tail = _supervise(argv, lambda pid: watcher_for(paths, pid), log, keep_watching, share)
        result = TrainingOutcome.read(result_json)
    if code == ExitCode.OK and result is not None:
        return result.with_(seconds=round(time.monotonic() - started, 3))
    failure = judge_exit(code, result, tail, free_disk_space)
    error_log(failure.message)
    raise failure


def _skip_if_trained(config: ExperimentConfig, log: Log) -> TrainingOutcome | None:
    done = already_trained(config)
    if done is not None:
        log(f"{config.run_name} already finished training at step {done.step} ({done.state.value}); "
            "not training again")
    return done
