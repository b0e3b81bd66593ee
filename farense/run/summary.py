"""training_summary.json: the typed record of how a training ended (the seed's file name and keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from farense.codes import RunState
from farense.console import human_seconds, human_value, markdown_table
from farense.overfitting import GAP_DEFINITION, GapReading, gap_legend, train_loss_label
from farense.run.fsutil import JsonRecord

if TYPE_CHECKING:
    from farense.config import OverfittingConfig


@dataclass(frozen=True)
class TrainingSummary(JsonRecord):
    """Written once when a training finishes; read by the task, the launcher, status, plots and decisions."""

    run_name: str = ""
    config_name: str = ""
    fingerprint: str | None = None
    data_fingerprint: str | None = None
    state: str = RunState.COMPLETED.value
    final_step: int = 0
    total_steps: int = 0
    best_step: int | None = None
    best_val_loss: float | None = None
    # The gap's train loss: the mean over the steps since the previous validation (farense.overfitting).
    train_loss_at_best: float | None = None
    train_loss_steps_at_best: int | None = None  # how many steps that mean covers
    train_val_gap: float | None = None  # best_val_loss - train_loss_at_best
    gap_status: str | None = None
    final_train_loss: float | None = None  # the same windowed mean, at the last validation
    final_train_loss_steps: int | None = None
    final_val_loss: float | None = None
    final_gap: float | None = None  # final_val_loss - final_train_loss
    last_step_train_loss: float | None = None  # one step's loss, for reference: not what the gap uses
    gap_definition: str = GAP_DEFINITION
    early_stopped: bool = False
    early_stop_step: int | None = None
    training_time_seconds: float = 0.0
    tokens_seen: int = 0
    best_checkpoint_step: int | None = None
    adapters: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    # Wall seconds per phase of this process's run (farense.train.phases): fixed costs beside steps.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    training_started_at: float | None = None  # wall clock when the trainer began (for outside timers)

    @property
    def finished(self) -> bool:
        """Training is over and the adapters are final (completed or early-stopped)."""
        try:
            return RunState(self.state).finished
        except ValueError:
            return False

    @property
    def gap_at_best(self) -> GapReading | None:
        """The gap at the best step with the two losses it is made of; None without a validation."""
        return GapReading.of(self.best_val_loss, self.train_loss_at_best, self.train_loss_steps_at_best)

    @property
    def final_gap_reading(self) -> GapReading | None:
        """The gap at the last validation with its two losses."""
        return GapReading.of(self.final_val_loss, self.final_train_loss, self.final_train_loss_steps)

    def display_rows(self) -> list[list[str]]:
        """(what, value) rows as a person reads them: the gap beside the two losses it is made of."""
        best, final = self.gap_at_best, self.final_gap_reading
        stopped = f"yes, at step {self.early_stop_step}" if self.early_stopped else "no"
        rows = [["state", self.state], ["steps", f"{self.final_step:,} of {self.total_steps:,}"],
                ["early stopped", stopped], ["best step", human_value(self.best_step)],
                ["validation loss at the best step", human_value(self.best_val_loss)]]
        if best is not None:
            rows += [[f"{train_loss_label(best.train_steps)} at the best step", human_value(best.train_loss)],
                     ["gap at the best step (validation - train)", f"{best.gap:+.4f} ({self.gap_status})"]]
        if final is not None and self.final_step != self.best_step:
            rows += [["validation loss at the last validation", human_value(final.val_loss)],
                     [f"{train_loss_label(final.train_steps)} at the last validation", human_value(final.train_loss)],
                     ["gap at the last validation", f"{final.gap:+.4f}"]]
        return rows + [["training time", human_seconds(self.training_time_seconds)],
                       ["tokens seen", human_value(self.tokens_seen)], ["adapters", f"`{self.adapters}`"]]

    def to_markdown(self, overfitting: OverfittingConfig) -> str:
        """The summary for the Prefect UI: the rows, then what the gap and its labels mean."""
        return (f"## Training summary: {self.run_name}\n\n" + markdown_table(["what", "value"], self.display_rows())
                + f"\n\nLabels: {gap_legend(overfitting)}.\n")
