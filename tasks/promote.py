"""Promotion: the run's best adapters become production/current, atomically and reversibly.

Only when the decision says "preferred and ready" and the flow was asked to promote; promoting
adapters that production already serves changes nothing (so a resumed flow does not promote twice).
With the config's [storage] remote set, the release goes to the store and the store's
production/current moves first, by compare-and-swap: a machine that loses it fails the task.
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
    from farense.run.objectstore import ObjectStore
    from farense.run.remote_releases import RemoteReleases

    log = get_run_logger()
    if not requested:
        return PromotionResult(False, None, None, "promotion not requested (promote=false)")
    if not decision.promote:
        log.info(f"not promoting {config.run_name}: {decision.verdict}")
        return PromotionResult(False, None, None, decision.verdict)
    store = ObjectStore.at(config.storage.remote)
    remote = RemoteReleases(store, store.key("production")) if store is not None else None
    if remote is not None:
        pointer = remote.current()
        before = pointer[0].release_id if pointer else None
    else:
        before = getattr(current_release(config.production_dir), "id", None)
    release = promote(Path(run_dir), Path(decision.decision_path), config.production_dir, remote=remote)
    if before == release.id:
        log.info(f"{config.run_name}'s adapters are already in production ({release.id})")
        return PromotionResult(False, release.id, release.previous, "already in production")
    log.info(f"promoted {config.run_name}: {config.production_dir}/current -> releases/{release.id}")
    return PromotionResult(True, release.id, release.previous, "promoted")
