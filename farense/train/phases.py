"""Where a run's wall time goes, phase by phase (training_summary.json's "phase_seconds").

A run's fixed costs (start-up, model load, the first step's compile, validation, checkpoints, the
finish) sit beside its steps; benchmarks compare them line by line with mlx_lm's.
"""

from __future__ import annotations

import time
from typing import Callable

# The phases, in the order a run meets them (a name not listed here is still booked).
PHASES = ("process_start_to_training", "checks_and_resume_choice", "model_load", "data_adapters_optimizer",
          "first_step_with_compile", "steps", "validation", "checkpoints", "finish_metrics_files", "finish_plot")


class PhaseClock:
    """`lap(name)` books the time since the previous lap to `name`; the clock is passed in."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, since_process_start: float | None = None):
        self._clock = clock
        self._last = clock()
        self.seconds: dict[str, float] = {}
        if since_process_start is not None:
            self.seconds["process_start_to_training"] = since_process_start
        self.started_at = time.time()  # wall clock, for tools that time the process from outside

    def lap(self, name: str) -> None:
        now = self._clock()
        self.seconds[name] = self.seconds.get(name, 0.0) + (now - self._last)
        self._last = now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def seconds_since_process_start() -> float | None:
    """From this process's start to now: the interpreter and the imports before training began."""
    try:
        import psutil

        return max(time.time() - psutil.Process().create_time(), 0.0)
    except Exception:  # no psutil, or a platform without process start times: not booked
        return None
