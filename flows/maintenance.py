"""Disk maintenance as a Prefect flow (the weekly-cleanup deployment).

Applies the cleanup policy over a config's runs directory: stale checkpoints beyond keep_last
(the best and the newest intact one always stay), interrupted writes, and the extras of finished
runs older than `older_than_days`. Live runs (their lock is held) and production are never touched.
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow

from farense.config import load_config
from farense.model.demos import overlays_for
from tasks.common import TASK_TAG, tag_flow_run
from farense.disk.cleanup import CleanupResult

from tasks.disk import cleanup_task

MAINTENANCE_FLOW = "farense-maintenance"


def maintenance_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"cleanup-{p.get('config', 'v2')}{'-dry-run' if p.get('dry_run') else ''}-{datetime.now():%Y-%m-%d-%H%M}"


@flow(name=MAINTENANCE_FLOW, flow_run_name=maintenance_run_name, retries=0)
def maintenance_flow(
    config: str = "v2",
    demo: bool | str = False,
    workspace: str | None = None,
    dry_run: bool = False,
    older_than_days: float | None = None,
) -> CleanupResult:
    """Clean the runs directory of `config` by its retention policy (dry_run: only report; older_than_days:
    None for the config's checkpoint.cleanup_after_days)."""
    cfg = load_config(config, overlays=list(overlays_for(demo)), workspace=workspace)
    tag_flow_run(TASK_TAG, "maintenance", f"config:{cfg.name}")
    return cleanup_task(cfg, dry_run=dry_run, older_than_days=older_than_days)


if __name__ == "__main__":
    maintenance_flow()
