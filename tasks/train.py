"""The training task: `farense train` in a child process, watched, retried only when a retry helps.

The trainer runs as a subprocess with --die-with-parent, so killing the flow's process (SIGKILL,
out of memory) also ends the trainer and frees the run lock; the next attempt, or the next flow
run after a crash, starts `farense train` again and it resumes from the newest verified
checkpoint. While it runs, metrics.jsonl and run_state.json are tailed into a Prefect progress
artifact, log lines and `farense.checkpoint.saved` events.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from farense.config import ExperimentConfig
from farense.console import markdown_table
from farense.layout import RunPaths, parse_checkpoint_name
from farense.states import EXIT_BAD_INPUT, EXIT_DISK_FULL, EXIT_LOCKED, EXIT_NUMERICAL, EXIT_OK, EXIT_PREEMPTED, RunState

from .common import artifact_key, best_effort, read_json
from .disk import free_disk_space

POLL_SECONDS = 2.0
MACHINE_LOCK_ENV = "FARENSE_TRAINING_LOCK"  # default ~/.farense/training.lock
RETRIES = 3
RETRY_DELAYS = [10, 30, 60]  # seconds, jittered by Prefect (retry_jitter_factor)

# Exit codes after which running again can succeed, and why.
CURABLE = {
    EXIT_PREEMPTED: "preempted: it checkpointed and stopped; the retry resumes",
    EXIT_DISK_FULL: "paused for disk: cleanup freed space; the retry resumes",
    EXIT_LOCKED: "another process holds the run lock; the retry waits for it",
}
NOT_CURABLE = {
    EXIT_BAD_INPUT: "bad config or data: fix the input, a retry cannot help",
    EXIT_NUMERICAL: "the loss became NaN or infinite: lower the learning rate",
}


@dataclass(frozen=True)
class TrainingOutcome:
    """How training ended (the trainer's --result-json), and whether this task ran it at all."""

    state: str
    run_dir: str
    step: int
    total_steps: int
    resumed_from: int | None
    best_step: int | None
    best_val_loss: float | None
    train_val_gap: float | None
    gap_status: str | None
    message: str = ""
    skipped: bool = False  # already trained with this config's fingerprint: nothing ran
    seconds: float = 0.0

    @classmethod
    def from_result(cls, data: dict[str, Any], **extra: Any) -> "TrainingOutcome":
        fields = {k: data.get(k) for k in cls.__dataclass_fields__ if k in data}
        fields.setdefault("step", 0)
        fields.setdefault("total_steps", 0)
        for k in ("resumed_from", "best_step", "best_val_loss", "train_val_gap", "gap_status"):
            fields.setdefault(k, None)
        return cls(**{**fields, **extra})


class TrainingFailed(Exception):
    """The trainer exited with an error; `retryable` says whether Prefect should run it again."""

    def __init__(self, message: str, exit_code: int, retryable: bool):
        super().__init__(message, exit_code, retryable)  # all in args: picklable for Prefect
        self.message, self.exit_code, self.retryable = message, exit_code, retryable

    def __str__(self) -> str:
        return self.message


def retry_only_curable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry preemption, disk pauses, locks and kills, nothing else."""
    return bool(getattr(state.data, "retryable", False))


def already_trained(config: ExperimentConfig) -> TrainingOutcome | None:
    """The run's summary, if this exact config (same fingerprint) already finished training on the
    same train/valid data (changed data means training again, which the trainer then refuses to
    resume into the old run: a person chooses --new-run)."""
    from farense.data import data_fingerprint

    paths = RunPaths(config.run_dir)
    summary = read_json(paths.summary)
    if not summary or summary.get("fingerprint") != config.fingerprint:
        return None
    if summary.get("data_fingerprint") != data_fingerprint(config):
        return None
    if not RunState(summary.get("state", RunState.FAILED.value)).finished:
        return None
    return TrainingOutcome(
        state=summary["state"], run_dir=str(paths.root), step=summary.get("final_step", 0),
        total_steps=summary.get("total_steps", 0), resumed_from=None, best_step=summary.get("best_step"),
        best_val_loss=summary.get("best_val_loss"), train_val_gap=summary.get("train_val_gap"),
        gap_status=summary.get("gap_status"), message="already trained with this config", skipped=True,
    )


@contextmanager
def one_training_on_this_machine(log: Any, run_name: str) -> Iterator[None]:
    """Wait for, then hold, the machine's training lock (fcntl: the kernel frees it if we die).

    Prefect's deployment and queue limits keep a server's runs apart; this also keeps out a flow
    started without that server (`farense run`), so two trainings never share memory or accelerator.
    """
    from farense.errors import RunLocked
    from farense.locks import RunLock, probe_lock

    path = Path(os.environ.get(MACHINE_LOCK_ENV) or Path.home() / ".farense" / "training.lock")
    lock = RunLock(path, command=f"train {run_name}")
    waited = False
    while True:
        try:
            lock.acquire()
            break
        except RunLocked:
            if not waited:
                log.info(f"waiting: another training runs on this machine ({probe_lock(path).describe()})")
                waited = True
            time.sleep(POLL_SECONDS)
    try:
        yield
    finally:
        lock.release()


def trainer_command(config: ExperimentConfig, demo: bool | str, result_json: Path) -> list[str]:
    """`python -m farense train` for this config, exactly as the flow resolved it."""
    from farense.demo import demo_overlay

    argv = [sys.executable, "-m", "farense", "--workspace", config.workspace, "train", config.source]
    if demo_overlay(demo):
        argv += ["--overlay", demo_overlay(demo)]
    return argv + ["--result-json", str(result_json), "--die-with-parent", "--no-progress"]


class TrainingWatcher:
    """Tails a run's metrics.jsonl, run_state.json and checkpoints into Prefect observability."""

    def __init__(self, paths: RunPaths, trainer_pid: int, log: Any, *,
                 on_checkpoint: Callable[[int], None] | None = None):
        self.paths, self.trainer_pid, self.log = paths, trainer_pid, log
        self.started_at = time.time()
        self.on_checkpoint = on_checkpoint or (lambda step: None)
        self.step = 0
        self.total: int | None = None
        self.resumed_from: int | None = None
        self.last: dict[str, Any] = {}
        self.last_val: dict[str, Any] = {}
        self._inode: int | None = None
        self._offset = 0
        self._checkpoints: set[int] = set(self._committed_checkpoints())
        self._artifact = best_effort("progress artifact", create_progress_artifact, 0.0,
                                     description=f"Training {paths.name}: starting")
        self._reported = -1.0

    def _committed_checkpoints(self) -> list[int]:
        try:
            names = os.listdir(self.paths.checkpoints)
        except FileNotFoundError:
            return []
        return [s for s in map(parse_checkpoint_name, names) if s is not None]

    def _new_rows(self) -> list[dict[str, Any]]:
        import orjson

        try:
            st = os.stat(self.paths.metrics_jsonl)
        except FileNotFoundError:
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:  # rewritten on resume: start over
            self._inode, self._offset = st.st_ino, 0
        with open(self.paths.metrics_jsonl, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self._offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return rows

    def poll(self) -> None:
        state = read_json(self.paths.state) or {}
        # Ours: written by the trainer we started, or (a launched data-parallel job, where rank 0
        # is a grandchild) written since we started it.
        if state.get("pid") == self.trainer_pid or (state.get("updated_at") or 0) >= self.started_at:
            self.total = state.get("total_steps") or self.total
            if self.resumed_from is None and state.get("resumed_from"):
                self.resumed_from = int(state["resumed_from"])
                self.log.info(f"training resumed from checkpoint step {self.resumed_from}")
        for row in self._new_rows():
            self.step = int(row.get("step", self.step))
            self.last = row
            if "val_loss" in row:
                self.last_val = row
        for step in sorted(set(self._committed_checkpoints()) - self._checkpoints):
            self._checkpoints.add(step)
            self.on_checkpoint(step)
        self._report()

    def _report(self) -> None:
        if not self.total or self._artifact is None:
            return
        pct = round(100.0 * min(self.step, self.total) / self.total, 1)
        if pct == self._reported:
            return
        self._reported = pct
        desc = f"Training {self.paths.name}: step {self.step}/{self.total}"
        if "train_loss" in self.last:
            desc += f", train loss {self.last['train_loss']:.4f}"
        if "val_loss" in self.last_val:
            desc += f", val loss {self.last_val['val_loss']:.4f} (step {self.last_val['step']})"
        best_effort("progress update", update_progress_artifact, self._artifact, pct, description=desc)


def _forward_output(stream: Any, log: Any, tail: list[str]) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip()
        if line:
            tail.append(line)
            del tail[:-40]
            log.info(line)


def _emit_checkpoint_event(paths: RunPaths, step: int) -> None:
    from prefect.events import emit_event

    best_effort(
        "checkpoint event",
        emit_event,
        event="farense.checkpoint.saved",
        resource={"prefect.resource.id": f"farense.run.{paths.name}", "prefect.resource.name": paths.name},
        payload={"step": step, "run_dir": str(paths.root)},
    )


def _describe_failure(code: int, result: dict[str, Any] | None, tail: list[str]) -> tuple[str, bool]:
    detail = (result or {}).get("message") or (tail[-1] if tail else "no output")
    if code < 0:
        return f"the trainer was killed by signal {-code} (out of memory?): {detail}", True
    if code in CURABLE:
        return f"{CURABLE[code]} ({detail})", True
    if code in NOT_CURABLE:
        return f"{NOT_CURABLE[code]}: {detail}", False
    # Any other farense error says itself whether running again can help.
    return f"the trainer failed (exit {code}): {detail}", bool((result or {}).get("retryable", False))


@task(
    name="train",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_only_curable,
    tags=["farense-train"],
    cache_policy=NO_CACHE,
)
def train_model(config: ExperimentConfig, demo: bool | str = False) -> TrainingOutcome:
    """Train or resume `config`; skipped when this exact config already finished training."""
    log = get_run_logger()
    paths = RunPaths(config.run_dir)
    if (done := _skip_if_trained(config, log)) is not None:
        return done

    started = time.monotonic()
    with one_training_on_this_machine(log, paths.name), tempfile.TemporaryDirectory(prefix="farense-train-") as tmp:
        if (done := _skip_if_trained(config, log)) is not None:  # trained while we waited for the machine
            return done
        result_json = Path(tmp) / "result.json"
        argv = trainer_command(config, demo, result_json)
        log.info("starting: " + " ".join(argv[1:]))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail: list[str] = []
        reader = threading.Thread(target=_forward_output, args=(proc.stdout, log, tail), daemon=True)
        reader.start()
        watcher = TrainingWatcher(paths, proc.pid, log, on_checkpoint=lambda s: _emit_checkpoint_event(paths, s))
        try:
            while proc.poll() is None:
                best_effort("watching the run", watcher.poll)  # observability never stops training
                try:
                    proc.wait(timeout=POLL_SECONDS)  # returns as soon as the trainer exits
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            proc.terminate()  # the flow is being cancelled: the trainer checkpoints and stops
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        reader.join(timeout=10)
        best_effort("watching the run", watcher.poll)
        result = read_json(result_json)

    code = proc.returncode
    seconds = round(time.monotonic() - started, 3)
    if code == EXIT_OK and result:
        outcome = TrainingOutcome.from_result(result, seconds=seconds)
        _summary_artifact(config)
        return outcome
    message, retryable = _describe_failure(code, result, tail)
    if code == EXIT_DISK_FULL:
        freed = free_disk_space(config)
        retryable = freed > 0
        message += f"; cleanup freed {freed} bytes" + ("" if retryable else ", so a retry cannot help")
    log.error(message)
    raise TrainingFailed(message, code, retryable)


SUMMARY_FIELDS = (
    ("state", "state"), ("final_step", "steps"), ("best_step", "best step"), ("best_val_loss", "best validation loss"),
    ("train_val_gap", "train/validation gap at best"), ("gap_status", "gap status"), ("early_stopped", "early stopped"),
    ("final_train_loss", "final train loss"), ("final_val_loss", "final validation loss"),
    ("training_time_seconds", "training time (s)"), ("tokens_seen", "tokens seen"), ("adapters", "adapters"),
)


def _skip_if_trained(config: ExperimentConfig, log: Any) -> TrainingOutcome | None:
    done = already_trained(config)
    if done is not None:
        log.info(f"{config.run_name} already finished training at step {done.step} ({done.state}); not training again")
        _summary_artifact(config)
    return done


def _summary_artifact(config: ExperimentConfig) -> None:
    """training_summary.json as a table in the UI."""
    summary = read_json(RunPaths(config.run_dir).summary) or {}
    def show(v: Any) -> Any:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else v

    rows = [[label, show(summary.get(k))] for k, label in SUMMARY_FIELDS]
    best_effort(
        "training summary artifact", create_markdown_artifact,
        markdown=f"## Training summary: {config.run_name}\n\n" + markdown_table(["", "value"], rows),
        key=artifact_key("training-summary", config.run_name),
        description=f"How training of {config.run_name} ended",
    )
