"""Named errors, one flat module (like rq's exceptions.py): every error farense raises on purpose.

Each carries a message written for the person who must fix the problem: which file, key or
line, and what is expected; its `exit_code` (farense.outcome.ExitCode) and, from that code,
`retryable`: whether running the same thing again could succeed.
"""

from __future__ import annotations

import errno
import os

from farense.codes import ExitCode, retryable


class FarenseError(Exception):
    """Base class: every error farense raises on purpose."""

    exit_code: int = ExitCode.FAILED
    retryable: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.retryable = retryable(cls.exit_code)  # one rule: the code says whether a retry can help


class ConfigError(FarenseError):
    """A config file is malformed: all problems are gathered into one message."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = "Config is not well-formed"
        if source:
            head += f" ({source})"
        if len(self.problems) == 1:
            msg = f"{head}: {self.problems[0]}"
        else:
            msg = head + ", found the following errors:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class DataError(FarenseError):
    """The training data is invalid (malformed JSON, missing fields, empty split)."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = f"Data is not valid: {self.problems[0]}"
        else:
            shown = self.problems[:20]
            more = len(self.problems) - len(shown)
            msg = "Data is not valid, found the following errors:\n" + "\n".join(f"  - {p}" for p in shown)
            if more:
                msg += f"\n  ... and {more} more"
        super().__init__(msg)


class ModelImportError(FarenseError):
    """A model file cannot be imported: not a GGUF, truncated, or an architecture or tensor type we cannot read."""

    exit_code = 2


class NotWritable(FarenseError):
    """A directory farense must write to is read-only or not ours to write: found before any work starts."""

    exit_code = ExitCode.BAD_INPUT


class FingerprintMismatch(FarenseError):
    """Resuming with a config whose training fields differ from the checkpoint's."""

    exit_code = ExitCode.BAD_INPUT


class CheckpointCorrupt(FarenseError):
    """A checkpoint's manifest does not verify; it must never be loaded."""


class NoUsableCheckpoint(FarenseError):
    """Checkpoints exist but none verifies: they were moved to quarantine/ and training does not start over by itself."""

    exit_code = ExitCode.NO_USABLE_CHECKPOINT


class DiskFull(FarenseError):
    """The disk guard stopped the run (flood level or ENOSPC); resumable once space is freed."""

    exit_code = ExitCode.DISK_FULL


class Preempted(FarenseError):
    """SIGTERM, SIGINT or SIGHUP: the run checkpointed and stopped; resume continues it."""

    exit_code = ExitCode.PREEMPTED


class NumericalError(FarenseError):
    """The loss became NaN or infinite; nothing from that step was checkpointed."""

    exit_code = ExitCode.NUMERICAL


class RunLocked(FarenseError):
    """Another live process holds the run's lock."""

    exit_code = ExitCode.LOCKED


class DecisionRefused(FarenseError):
    """Promotion was refused because the decision says no (use --force to override)."""

    exit_code = ExitCode.DECISION_REFUSED


class PeerLost(FarenseError):
    """Another rank died or was lost: this rank stopped; the job resumes from the last checkpoint."""

    exit_code = ExitCode.PREEMPTED


class RankFailed(FarenseError):
    """A rank of a launched job died of an exception that is no peer's loss: a bug or a broken
    install, not a preemption; a retry would fail the same way."""

    exit_code = ExitCode.FAILED


class ResumeLimitReached(FarenseError):
    """The run crashed and was resumed too many times in a row; a person should look."""


class TrainingFailed(FarenseError):
    """The trainer process exited with an error; `retryable` says whether Prefect should run it again."""

    def __init__(self, message: str, exit_code: int, retryable: bool):
        super().__init__(message, exit_code, retryable)  # all in args: picklable for Prefect
        self.message, self.exit_code, self.retryable = message, exit_code, retryable

    def __str__(self) -> str:
        return self.message


_NOT_OURS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def storage_error(exc: OSError) -> FarenseError:
    """An OSError that reached the command line as the named error a person can act on (one line, its code)."""
    name = exc.filename
    where = f"{os.path.abspath(name) if isinstance(name, str) else name}: " if name else ""
    if exc.errno in _NOT_OURS:
        return NotWritable(f"cannot use {where}{_NOT_OURS[exc.errno]}; make it writable (or use another "
                           "workspace) and run again")
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DiskFull(f"disk full while writing {where}{exc.strerror}; free space and run again")
    return FarenseError(f"{where}{exc.strerror or exc}")

