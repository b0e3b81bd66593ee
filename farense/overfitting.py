"""Overfitting labels and early stopping: small pure logic, tested on scripted loss sequences."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from enum import Enum

from .config import EarlyStoppingConfig, OverfittingConfig


class GapStatus(str, Enum):
    """The seed's labels for the train/validation gap (val loss - train loss)."""

    EXCELENTE = "EXCELENTE"
    BOM = "BOM"
    MODERADO = "MODERADO"
    CRITICO = "CRÍTICO"


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


def observe_validation(
    state: EarlyStoppingState, step: int, val_loss: float, cfg: EarlyStoppingConfig
) -> tuple[EarlyStoppingState, bool]:
    """Record one validation; returns the new state and whether this is a new best.

    As in Keras' EarlyStopping, a validation is an improvement when it beats the reference (the
    last improving loss) by more than min_delta, so tiny gains cannot creep the reference down;
    the best adapters follow the lowest loss seen. Patience 0 never stops.
    """
    is_best = state.best_val_loss is None or val_loss < state.best_val_loss
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
