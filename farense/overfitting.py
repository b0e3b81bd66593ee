"""Overfitting labels, the train/validation gap's one definition, and early stopping: small pure logic.

The gap is validation loss minus *the* train loss: the mean of the optimizer steps' train losses
since the previous validation (validation.every_steps of them; fewer at the end of training). The
log, training_summary.json, the decision, the monitor and the notification all show that number,
labelled by `train_loss_label`, so that gap = val - train holds wherever a person reads it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only annotations: outcome.py and summary.py import this module, and config imports them
    from farense.config import EarlyStoppingConfig, OverfittingConfig


class GapStatus(str, Enum):
    """The seed's labels for the train/validation gap (val loss - train loss)."""

    EXCELENTE = "EXCELENTE"
    BOM = "BOM"
    MODERADO = "MODERADO"
    CRITICO = "CRÍTICO"


GAP_DEFINITION = ("validation loss - train loss, where the train loss is the mean of the optimizer steps' train "
                  "losses since the previous validation")


def train_loss_label(steps: int | None) -> str:
    """How the gap's train loss is named wherever it is shown: which window it averages."""
    if not steps:
        return "train loss (mean since the previous validation)"
    return f"train loss (mean of last {steps} step{'s' if steps != 1 else ''})"


@dataclass(frozen=True)
class GapReading:
    """One validation's gap with the two losses it is made of (train: the windowed mean above)."""

    val_loss: float
    train_loss: float
    train_steps: int

    @classmethod
    def of(cls, val_loss: float | None, train_loss: float | None, train_steps: int | None) -> GapReading | None:
        """The reading from a record's fields; None when there was no validation."""
        if val_loss is None or train_loss is None:
            return None
        return cls(val_loss, train_loss, train_steps or 0)

    @property
    def gap(self) -> float:
        return self.val_loss - self.train_loss

    def describe(self) -> str:
        """'val 4.6615 - train 4.5190 (mean of last 5 steps) = gap +0.1425' (4 decimals, so within rounding)."""
        return (f"val {self.val_loss:.4f} - train {self.train_loss:.4f} "
                f"({train_loss_label(self.train_steps).removeprefix('train loss (')} = gap {self.gap:+.4f}")


def gap_legend(thresholds: OverfittingConfig) -> str:
    """What the seed's labels mean, said once where they first appear."""
    t = thresholds
    return (f"gap = validation loss - train loss (the mean of the steps since the previous validation); "
            f"EXCELENTE below {t.excelente_below}, BOM below {t.bom_below}, MODERADO below {t.moderado_below}, "
            f"CRÍTICO from {t.moderado_below} up")


def classify_gap(gap: float, thresholds: OverfittingConfig) -> GapStatus:
    """EXCELENTE below excelente_below, BOM below bom_below (0.15, the seed's target), MODERADO
    below moderado_below, CRÍTICO otherwise. A negative gap (validation better than train) is EXCELENTE."""
    if math.isnan(gap):
        return GapStatus.CRITICO
    if gap < thresholds.excelente_below:
        return GapStatus.EXCELENTE
    if gap < thresholds.bom_below:
        return GapStatus.BOM
    if gap < thresholds.moderado_below:
        return GapStatus.MODERADO
    return GapStatus.CRITICO


@dataclass(frozen=True)
class EarlyStoppingState:
    """Saved in every checkpoint so a resumed run counts patience where it left off."""

    best_val_loss: float | None = None
    best_step: int | None = None
    reference_val_loss: float | None = None  # moves only on an improvement larger than min_delta
    evaluations_without_improvement: int = 0
    stopped_at: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EarlyStoppingState":
        return cls(**d)


def improves_best(val_loss: float | None, best_so_far: float | None) -> bool:
    """The one definition of "best": the lowest validation loss, the earlier step winning a tie.

    The best adapters, the best checkpoint (retention keeps it) and cleanup's reading of the
    manifests all follow it.
    """
    return val_loss is not None and (best_so_far is None or val_loss < best_so_far)


def observe_validation(
    state: EarlyStoppingState, step: int, val_loss: float, cfg: EarlyStoppingConfig
) -> tuple[EarlyStoppingState, bool]:
    """Record one validation; returns the new state and whether this is a new best.

    As in Keras' EarlyStopping, a validation is an improvement when it beats the reference (the
    last improving loss) by more than min_delta, so tiny gains cannot creep the reference down;
    the best adapters follow the lowest loss seen. Patience 0 never stops.
    """
    is_best = improves_best(val_loss, state.best_val_loss)
    improved = state.reference_val_loss is None or val_loss < state.reference_val_loss - cfg.min_delta
    waited = 0 if improved else state.evaluations_without_improvement + 1
    new = replace(
        state,
        best_val_loss=val_loss if is_best else state.best_val_loss,
        best_step=step if is_best else state.best_step,
        reference_val_loss=val_loss if improved else state.reference_val_loss,
        evaluations_without_improvement=waited,
    )
    if cfg.patience and waited >= cfg.patience:
        new = replace(new, stopped_at=step)
    return new, is_best
