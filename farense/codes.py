"""The shared vocabulary of how a run stands and how a process ended: run states and exit codes.

A leaf: it imports nothing of farense, so the errors, the run files, the trainer, the CLI, the
flows and the monitor can all use it. Whether a retry can help is decided here, once, from the code.
"""

from __future__ import annotations

from enum import Enum, IntEnum


class RunState(str, Enum):
    """Run states shared by the trainer, the CLI, the flows, the monitor and cleanup."""

    NOT_STARTED = "not-started"  # never written by the trainer: no run_state.json yet
    RUNNING = "running"
    PREEMPTED = "preempted"
    PAUSED_DISK_FULL = "paused-disk-full"
    CRASHED = "crashed"
    FAILED = "failed"
    EARLY_STOPPED = "early-stopped"
    COMPLETED = "completed"

    @property
    def finished(self) -> bool:
        """Training is over and its adapters are final."""
        return self in (RunState.COMPLETED, RunState.EARLY_STOPPED)

    @property
    def resumable(self) -> bool:
        return self in (RunState.PREEMPTED, RunState.PAUSED_DISK_FULL, RunState.CRASHED, RunState.RUNNING)


class ExitCode(IntEnum):
    """Process exit codes of `farense train`, so a parent (Prefect task, shell) can tell them apart."""

    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    NUMERICAL = 3
    DECISION_REFUSED = 4  # promotion refused by the decision rules (--force overrides)
    LOCKED = 73  # EX_CANTCREAT-like: another live process holds the run lock
    NO_USABLE_CHECKPOINT = 74  # EX_IOERR-like: checkpoints exist, none verifies (moved to quarantine/)
    PREEMPTED = 75  # EX_TEMPFAIL: checkpointed and stopped; running again resumes
    DISK_FULL = 76  # paused before the disk filled; resumable once space is freed

    @property
    def retryable(self) -> bool:
        """Running the same thing again can succeed (after the cause went away)."""
        return self in _ADVICE and _ADVICE[self][0]

    @property
    def state(self) -> RunState:
        """The run state a run stopped with this code is left in."""
        return _STATE.get(self, RunState.FAILED)


# code -> (a retry can help, what it means for whoever decides on a retry)
_ADVICE: dict[ExitCode, tuple[bool, str]] = {
    ExitCode.PREEMPTED: (True, "preempted: it checkpointed and stopped; the retry resumes"),
    ExitCode.DISK_FULL: (True, "paused for disk: cleanup freed space; the retry resumes"),
    ExitCode.LOCKED: (True, "another process holds the run lock; the retry waits for it"),
    ExitCode.BAD_INPUT: (False, "bad config or data: fix the input, a retry cannot help"),
    ExitCode.NUMERICAL: (False, "the loss became NaN or infinite: lower the learning rate"),
    ExitCode.NO_USABLE_CHECKPOINT: (False, "no checkpoint verifies (moved to checkpoints/quarantine/); a retry "
                                           "would start over: restore one, or start over with --new-run"),
}
_STATE = {ExitCode.OK: RunState.COMPLETED, ExitCode.PREEMPTED: RunState.PREEMPTED,
          ExitCode.DISK_FULL: RunState.PAUSED_DISK_FULL}
# A data-parallel job's code when ranks disagree: what a retry cannot cure first.

def as_exit_code(code: int) -> ExitCode | None:
    """The named code for `code`, None for one farense does not use (a signal, a crash)."""
    try:
        return ExitCode(code)
    except ValueError:
        return None


def retryable(code: int) -> bool:
    """Whether a process that exited with `code` may succeed when run again."""
    named = as_exit_code(code)
    return named is not None and named.retryable


def state_for_code(code: int) -> RunState:
    named = as_exit_code(code)
    return named.state if named is not None else RunState.FAILED


def explain_exit(code: int, detail: str, reported_retryable: bool = False,
                 freed_bytes: int | None = None) -> tuple[str, bool]:
    """(message, retryable) for a trainer process that ended with `code`; a signal is resumable.

    Any other code is retried only if the trainer's own outcome said a retry can help; a disk-full
    pause only if the cleanup that followed it (`freed_bytes`) freed something.
    """
    if code == ExitCode.DISK_FULL and freed_bytes is not None:
        message, _ = explain_exit(code, detail)
        helps = freed_bytes > 0
        return message + f"; cleanup freed {freed_bytes} bytes" + ("" if helps else ", so a retry cannot help"), helps
    if code < 0:
        return f"the trainer was killed by signal {-code} (out of memory?): {detail}", True
    named = as_exit_code(code)
    if named in _ADVICE:
        can_retry, advice = _ADVICE[named]  # type: ignore[index]
        return (f"{advice} ({detail})" if can_retry else f"{advice}: {detail}"), can_retry
    return f"the trainer failed (exit {code}): {detail}", reported_retryable


def died(code: int | None) -> bool:
    """Ended by a signal (locally negative, through ssh 128+N or 255) or by the launcher: not its own decision."""
    return code is None or code < 0 or code > 128
