"""Run states shared by the trainer, the CLI, the flows and the monitor."""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
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


