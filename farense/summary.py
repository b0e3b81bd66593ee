"""training_summary.json: the typed record of how a training ended (the seed's file name and keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .fsutil import JsonRecord
from .runstate import RunState


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
    train_loss_at_best: float | None = None
    train_val_gap: float | None = None
    gap_status: str | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    final_gap: float | None = None
    early_stopped: bool = False
    early_stop_step: int | None = None
    training_time_seconds: float = 0.0
    tokens_seen: int = 0
    best_checkpoint_step: int | None = None
    adapters: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Training is over and the adapters are final (completed or early-stopped)."""
        try:
            return RunState(self.state).finished
        except ValueError:
            return False
