"""Named errors, one flat module (like rq's exceptions.py).

Each carries a message written for the person who must fix the problem: which file, key or
line, and what is expected. `retryable` tells the orchestration layer whether running the same
thing again could succeed.
"""

from __future__ import annotations


class FarenseError(Exception):
    """Base class: every error farense raises on purpose."""

    retryable: bool = False
    exit_code: int = 1


class ConfigError(FarenseError):
    """A config file is malformed: all problems are gathered into one message."""

    exit_code = 2

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

    exit_code = 2

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


class FingerprintMismatch(FarenseError):
    """Resuming with a config whose training fields differ from the checkpoint's."""

    exit_code = 2


class CheckpointCorrupt(FarenseError):
    """A checkpoint's manifest does not verify; it must never be loaded."""


class DiskFull(FarenseError):
    """The disk guard stopped the run (flood level or ENOSPC); resumable once space is freed."""

    retryable = True
    exit_code = 76


class Preempted(FarenseError):
    """SIGTERM/SIGINT: the run checkpointed and stopped; resume continues it."""

    retryable = True
    exit_code = 75


class NumericalError(FarenseError):
    """The loss became NaN or infinite; nothing from that step was checkpointed."""

    exit_code = 3


class RunLocked(FarenseError):
    """Another live process holds the run's lock."""

    retryable = True
    exit_code = 73


class DecisionRefused(FarenseError):
    """Promotion was refused because the decision says no (use --force to override)."""

    exit_code = 4
