"""Run state: RunState, run_state.json, the state corrected by the run lock, and which directories are runs.

The trainer writes run_state.json; the monitor, `farense status`, cleanup and the training task's
watcher read it through here. A state file saying "running" with no live holder of the run lock
is a crash (the kernel drops a flock when its holder dies, even by SIGKILL); a held lock means
running whatever the state file still says.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import orjson

from farense.codes import RunState
from farense.run.fsutil import atomic_write_bytes, read_json_object
from farense.run.layout import RUN_MARKERS, RUN_OWN_DIRS, RUN_STATE_FILE, is_temporary

if TYPE_CHECKING:
    from farense.run.locks import LockInfo


# --------------------------------------------------------------------------- run_state.json


def write_run_state(path: Path, state: RunState, *, durable: bool = True, **fields: Any) -> None:
    """Replace the state file atomically (readers never see half a file).

    Per-step updates pass durable=False: renamed into place but not fsynced, since resume reads
    checkpoints, not this file, and an fsync per optimizer step costs real time on slow disks.
    """
    payload = {
        "state": state.value,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "updated_at": time.time(),
        **fields,
    }
    atomic_write_bytes(path, orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY),
                       durable=durable)


class RunRecorder:
    """The trainer's one writer of run_state.json: started, progress (at most every `interval` seconds
    unless forced), stopped; the monitor, status, cleanup and the Prefect watcher only read it."""

    def __init__(self, path: Path, *, total_steps: int, resumed_from: int | None, fingerprint: str,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic, interval: float = 1.0) -> None:
        self.path, self.total_steps, self.resumed_from, self.fingerprint = path, total_steps, resumed_from, fingerprint
        self.enabled, self.clock, self.interval = enabled, clock, interval
        self._last_write = -math.inf

    def started(self, step: int) -> None:
        """RUNNING, durable: the run has its lock and starts (or resumes) at `step`."""
        if self.enabled:
            write_run_state(self.path, RunState.RUNNING, step=step, total_steps=self.total_steps,
                            resumed_from=self.resumed_from, fingerprint=self.fingerprint)

    def progress(self, step: int, *, last_train_loss: float, last_val_loss: float | None, force: bool = False) -> None:
        """RUNNING with the latest losses; for people and monitors, so at most about once per `interval`
        (and whenever `force`: a step that validated or checkpointed), not fsynced."""
        now = self.clock()
        if not self.enabled or not (force or now - self._last_write >= self.interval):
            return
        self._last_write = now
        write_run_state(self.path, RunState.RUNNING, durable=False, step=step, total_steps=self.total_steps,
                        resumed_from=self.resumed_from, fingerprint=self.fingerprint,
                        last_train_loss=last_train_loss, last_val_loss=last_val_loss)

    def stopped(self, state: RunState, step: int, message: str) -> None:
        """How the loop ended (best effort: on a full disk even this small file may not fit)."""
        if not self.enabled:
            return
        try:
            write_run_state(self.path, state, step=step, total_steps=self.total_steps,
                            resumed_from=self.resumed_from, message=message)
        except OSError:
            pass

    @staticmethod
    def refused(path: Path, message: str) -> None:
        """FAILED before any step: the run could not start (no usable checkpoint) and says why."""
        write_run_state(path, RunState.FAILED, step=0, message=message)


def read_run_state(path: Path) -> dict[str, Any] | None:
    """run_state.json as written, None when it is missing or not a JSON object."""
    return read_json_object(path)


CORRUPT = "corrupt"  # not a RunState: run_state.json is there but says nothing readable


def run_state_problem(path: Path) -> str | None:
    """Why an existing run_state.json cannot be read as a state; None when it reads (or is missing)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable: {exc}"
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON: {exc}"
    if not isinstance(doc, dict):
        return f"not a JSON object but {type(doc).__name__}"
    if not isinstance(doc.get("state"), str):
        return f"its state is {doc.get('state')!r}, expected one of {', '.join(s.value for s in RunState)}"
    return None


# --------------------------------------------------------------------------- the state, corrected by the lock


class EffectiveState(NamedTuple):
    """What a run is doing: a RunState value (or the unknown value a file holds), the sentence a person reads."""

    state: str
    detail: str
    running: bool


def pid_alive(pid: int) -> bool:
    """Is `pid` a live process on this host? A zombie (dead, not yet reaped) counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # psutil missing or the process vanished between the two calls
        return True


_DETAILS = {
    RunState.COMPLETED: "completed",
    RunState.PREEMPTED: "preempted (resumable: run `farense train` again)",
    RunState.PAUSED_DISK_FULL: "paused: disk full (resumable once space is freed)",
    RunState.CRASHED: "crashed",
}


def effective_state(doc: Mapping[str, Any] | None, lock: LockInfo, *, alive: Callable[[int], bool] = pid_alive,
                    host: str | None = None, problem: str | None = None) -> EffectiveState:
    """run_state.json (`doc`) corrected by the run lock; `problem`: why the file there could not be read."""
    here = host or socket.gethostname()
    doc = doc or {}
    recorded = doc.get("state") if isinstance(doc.get("state"), str) else None
    if lock.held:
        who = f"pid {lock.pid}" if lock.pid is not None else "a live process"
        starting = ", starting" if recorded != RunState.RUNNING.value else ""
        return EffectiveState(RunState.RUNNING.value, f"running ({who}{starting})", True)
    if problem is not None:
        return EffectiveState(CORRUPT, f"unknown: {RUN_STATE_FILE} is corrupt ({problem}); `farense train` "
                              "resumes from the checkpoints all the same", False)
    if recorded is None:
        return EffectiveState(RunState.NOT_STARTED.value, "not started (no run_state.json yet)", False)
    pid = doc.get("pid") if isinstance(doc.get("pid"), int) else lock.pid
    message = str(doc.get("message") or "")
    if recorded == RunState.RUNNING.value:
        doc_host = doc.get("host")
        if isinstance(doc_host, str) and doc_host != here:
            return EffectiveState(RunState.RUNNING.value, f"running on {doc_host} according to run_state.json "
                                  f"(its lock cannot be checked from {here})", True)
        if pid is None:
            why = "no live process holds the run lock"
        elif alive(pid):
            why = f"pid {pid} is alive but does not hold the run lock"
        else:
            why = f"pid {pid} is dead"
        return EffectiveState(RunState.CRASHED.value, f"crashed ({why})", False)
    try:
        state = RunState(recorded)
    except ValueError:
        return EffectiveState(recorded, f"unknown state {recorded!r} in run_state.json", False)
    if state in (RunState.EARLY_STOPPED, RunState.FAILED):
        return EffectiveState(state.value, f"{state.value}{': ' + message if message else ''}", False)
    return EffectiveState(state.value, _DETAILS.get(state, state.value), False)


# --------------------------------------------------------------------------- which directories are runs


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """A directory the trainer has started writing: one of layout.RUN_MARKERS is in it."""
    return any(os.path.lexists(os.path.join(path, m)) for m in RUN_MARKERS)


def find_runs(root: str | os.PathLike[str], *, max_depth: int = 3, follow_symlinks: bool = True,
              exclude: Callable[[Path], str | None] | None = None,
              skipped: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Run directories under `root` (runs/v2, and runs/demo/v2 below a group), sorted by path.

    Dot names and temporaries are never runs. `exclude(path)` gives a reason to pass a directory
    over (cleanup: production); with `follow_symlinks=False` a linked run is passed over too. What
    is passed over is appended to `skipped` as (path, reason).
    """
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    notes = skipped if skipped is not None else []

    def walk(d: Path, depth: int) -> None:
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        for e in entries:
            if is_temporary(e.name) or e.name.startswith("."):
                continue
            path = Path(e.path)
            if e.is_symlink() and not follow_symlinks:
                if is_run_dir(path):
                    notes.append((path, "symlink: not followed"))
                continue
            if not e.is_dir():
                continue
            if exclude is not None and (why := exclude(path)) is not None:
                notes.append((path, why))
            elif is_run_dir(path):
                found.append(path)
            elif depth < max_depth:
                walk(path, depth + 1)

    walk(root, 1)
    return found


def runs_inside(path: str | os.PathLike[str], *, max_depth: int = 3) -> list[Path]:
    """Runs below `path`, not `path` itself (a run's own checkpoints, adapters, ... are not searched)."""
    found: list[Path] = []
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return found
    for e in entries:
        if e.name in RUN_OWN_DIRS or e.name.startswith(".") or is_temporary(e.name) \
                or not e.is_dir(follow_symlinks=False):
            continue
        found += find_runs(e.path, max_depth=max_depth - 1, follow_symlinks=False)
    return found


def run_placement_problem(run_dir: str | os.PathLike[str], *, workspace: str | os.PathLike[str] | None = None,
                          levels: int = 3) -> str | None:
    """Why `run_dir` may not hold a run (it lies inside another run, or holds runs); None when it may.

    A run directory never contains another: cleanup of the outer one would take the inner one as
    its extras. `levels` parents are looked at (as deep as cleanup looks for runs), below the workspace.
    """
    run_dir = Path(run_dir)
    above = {Path(workspace), *Path(workspace).parents} if workspace is not None else set()
    for parent in list(run_dir.parents)[:levels]:
        if parent not in above and is_run_dir(parent):
            return (f"{run_dir} would lie inside the run {parent}; a run directory never contains another run "
                    "(choose another output.run_name or output.runs_dir)")
    inner = runs_inside(run_dir)
    if inner:
        shown = ", ".join(str(p) for p in inner[:3]) + (", ..." if len(inner) > 3 else "")
        return (f"{run_dir} holds other runs ({shown}); a run directory never contains another run "
                "(choose another output.run_name or output.runs_dir)")
    return None
