"""Promotion: the run's best adapters become production/current, atomically and reversibly.

Only when the decision says "preferred and ready" and the flow was asked to promote; promoting
adapters that production already serves changes nothing (so a resumed flow does not promote twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger

from farense.config import ExperimentConfig

from .common import step
from .decide import DecisionResult


@dataclass(frozen=True)
class PromotionResult:
    promoted: bool
    release_id: str | None
    previous: str | None
    reason: str


@step("promote")
def promote_task(config: ExperimentConfig, run_dir: str, decision: DecisionResult, requested: bool = True) -> PromotionResult:
    """Promote when asked to and the decision allows it; say why not otherwise."""
    from farense.release.promotion import current_release, promote

    log = get_run_logger()
    if not requested:
        return PromotionResult(False, None, None, "promotion not requested (promote=false)")
    if not decision.promote:
        log.info(f"not promoting {config.run_name}: {decision.verdict}")
        return PromotionResult(False, None, None, decision.verdict)
    before = current_release(config.production_dir)
    release = promote(Path(run_dir), Path(decision.decision_path), config.production_dir)
    if before is not None and before.id == release.id:
        log.info(f"{config.run_name}'s adapters are already in production ({release.id})")
        return PromotionResult(False, release.id, release.previous, "already in production")
    log.info(f"promoted {config.run_name}: {config.production_dir}/current -> releases/{release.id}")
    return PromotionResult(True, release.id, release.previous, "promoted")
