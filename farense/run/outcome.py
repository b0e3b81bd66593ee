"""How a training ended: the exit codes, whether a retry can help, and the one typed outcome.

The trainer, the `farense train` command, the data-parallel launcher and the Prefect task all ask
this module; none keeps its own table of codes. The outcome crosses process boundaries as JSON
(`--result-json`), written with `to_json` and read back with `from_json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farense.codes import ExitCode, RunState, died, retryable, state_for_code
from farense.overfitting import GapReading
from farense.run.fsutil import JsonRecord

if TYPE_CHECKING:
    from farense.errors import FarenseError


# A data-parallel job's code when ranks disagree: what a retry cannot cure first.
_JOB_PRIORITY = (ExitCode.BAD_INPUT, ExitCode.NO_USABLE_CHECKPOINT, ExitCode.NUMERICAL, ExitCode.FAILED,
                 ExitCode.DISK_FULL, ExitCode.LOCKED, ExitCode.PREEMPTED)


def job_exit_code(rank_codes: dict[int, int | None], world_size: int) -> int:
    """One exit code for a data-parallel job, with the meaning a single trainer's code has.

    `rank_codes` holds the failed ranks in the order the launcher reported them (a rank with no
    code finished cleanly: mlx.launch reports failures only). What happened first decides: once a
    rank fails, mlx.launch kills the others, and those deaths are consequences, not causes. So a
    rank that died first (signal, launcher kill, lost host) makes the job resumable, whatever the
    others reported afterwards; a rank that exited with its own code first (an exception: 1, bad
    input 2, NaN 3, ...) gives the job the most telling of the codes reported before any death:
    bad input, numerical errors and bugs cannot be cured by a retry; a full disk, a held lock and
    a preemption can.
    """
    codes = [rank_codes.get(r, ExitCode.OK) for r in range(world_size)]
    if all(c == ExitCode.OK for c in codes):
        return ExitCode.OK
    before_death: list[int] = []
    for c in rank_codes.values():  # report order
        if died(c):
            break
        if c != ExitCode.OK:
            before_death.append(c)  # type: ignore[arg-type]
    if not before_death:
        return ExitCode.PREEMPTED
    for wanted in _JOB_PRIORITY:
        if wanted in before_death:
            return wanted
    return before_death[0]


@dataclass(frozen=True)
class TrainingOutcome(JsonRecord):
    """How one training (or data-parallel job) ended; `farense train --result-json` writes it."""

    state: RunState
    run_dir: str
    step: int = 0
    total_steps: int = 0
    resumed_from: int | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    train_val_gap: float | None = None  # best_val_loss - train_loss_at_best
    gap_status: str | None = None
    train_loss_at_best: float | None = None  # the gap's train loss (farense.overfitting.GapReading)
    train_loss_steps_at_best: int | None = None
    message: str = ""
    exit_code: int = ExitCode.OK
    error: str | None = None  # the named error's class, on failure
    retryable: bool = False
    skipped: bool = False  # already trained with this config's fingerprint: nothing ran
    seconds: float = 0.0
    world_size: int | None = None  # a launched job: ranks, how each failed, whether we had to kill
    ranks: dict[str, int | None] | None = None
    killed_after_timeout: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK

    @property
    def gap_at_best(self) -> GapReading | None:
        """The gap at the best step with the two losses it is made of; None without a validation."""
        return GapReading.of(self.best_val_loss, self.train_loss_at_best, self.train_loss_steps_at_best)

    @classmethod
    def from_error(cls, run_dir: str | Path, error: FarenseError) -> TrainingOutcome:
        """The outcome of a training stopped by a named error (its code says the rest)."""
        return cls.failure(run_dir, error.exit_code, str(error), type(error).__name__, error.retryable)

    @classmethod
    def failure(cls, run_dir: str | Path, code: int, message: str, error: str,
                can_retry: bool | None = None) -> TrainingOutcome:
        return cls(state=state_for_code(code), run_dir=str(run_dir), message=message, error=error, exit_code=code,
                   retryable=retryable(code) if can_retry is None else can_retry)

    @classmethod
    def from_summary(cls, run_dir: str | Path, summary: Any, *, message: str = "", skipped: bool = False) -> TrainingOutcome:
        """A finished run's outcome from its training_summary.json (farense.summary.TrainingSummary)."""
        return cls(state=RunState(summary.state), run_dir=str(run_dir), step=summary.final_step,
                   total_steps=summary.total_steps, best_step=summary.best_step,
                   best_val_loss=summary.best_val_loss, train_val_gap=summary.train_val_gap,
                   gap_status=summary.gap_status, train_loss_at_best=summary.train_loss_at_best,
                   train_loss_steps_at_best=summary.train_loss_steps_at_best, message=message, skipped=skipped)

    def with_(self, **changes: Any) -> TrainingOutcome:
        return replace(self, **changes)

    def describe(self) -> str:
        """One line for a terminal: where it ended and how good the best adapters are."""
        best = self.best_val_loss if self.best_val_loss is None else round(self.best_val_loss, 4)
        gap = "-" if self.train_val_gap is None else f"{self.train_val_gap:+.4f}"
        return (f"{self.state.value}: step {self.step}/{self.total_steps}, best val loss {best} at step "
                f"{self.best_step}, gap {gap} {self.gap_status} -> {self.run_dir}/adapters")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["exit_code"] = int(self.exit_code)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingOutcome:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = RunState(values.get("state", RunState.FAILED.value))
        values.setdefault("run_dir", "")
        return cls(**values)
