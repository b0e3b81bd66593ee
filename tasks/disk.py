"""Disk steps: the preflight before training and the cleanup of stale checkpoints by policy.

Both are thin over farense.disk.diskguard and farense.disk.cleanup, which never delete what a live run or
production needs. The preflight already cleans by policy when the run would not fit, and raises
DiskFull (naming the command that would free more) when even that is not enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from farense.config import ExperimentConfig, format_size
from farense.console import markdown_table
from farense.disk.cleanup import (
    CleanupResult,
    apply_cleanup,
    plan_for_config,
    summary_rows,
)
from farense.disk.remote_cleanup import REMOTE_HEADERS, remote_rows
from farense.run.objectstore import ObjectStore

from .common import artifact_key, best_effort, step

CLEANUP_HEADERS = ["run", "kind", "items", "what", "bytes", "why"]


@dataclass(frozen=True)
class PreflightResult:
    ok: bool
    needed_bytes: int
    free_bytes: int
    cleanup_freed_bytes: int
    warnings: tuple[str, ...] = ()


@step("disk-preflight")
def preflight_task(config: ExperimentConfig, alongside: list[ExperimentConfig] | None = None) -> PreflightResult:
    """Will the run fit on disk (with the runs training `alongside` it)? Publishes the preflight table;
    raises DiskFull when it cannot fit."""
    from farense.disk.preflight import preflight
    from farense.errors import DiskFull

    log = get_run_logger()
    try:
        report = preflight(config, alongside=alongside or ())
    except DiskFull as e:
        short = getattr(e, "report", None)
        if short is not None:
            _preflight_artifact(config, short)
        raise
    needed, free = _preflight_artifact(config, report)
    for w in report.warnings:
        log.warning(w)
    freed = report.cleanup.bytes_freed if report.cleanup is not None else 0
    beside = f" with {', '.join(c.run_name for c in alongside)} training beside it" if alongside else ""
    log.info(f"disk preflight ok{beside}: needs {format_size(needed)}, {format_size(free)} free"
             + (f", cleanup freed {format_size(freed)}" if freed else ""))
    return PreflightResult(report.ok, needed, free, freed, tuple(report.warnings))


def _preflight_artifact(config: ExperimentConfig, report: Any) -> tuple[int, int]:
    """The preflight's tables in the UI, with a one-line description; returns (needed, free) bytes."""
    from farense.disk.preflight import render_preflight

    needed = sum(r.needed for r in report.rows)
    free = min((r.free for r in report.rows), default=0)
    best_effort("preflight artifact", create_markdown_artifact, markdown=render_preflight(report),
                key=artifact_key("preflight", config.run_name),
                description=f"needs {format_size(needed)}, {format_size(free)} free: {'ok' if report.ok else 'SHORT'}")
    return needed, free


@step("cleanup")
def cleanup_task(config: ExperimentConfig, dry_run: bool = False, older_than_days: float | None = None,
                 remote: str = "") -> CleanupResult:
    """Delete stale checkpoints and leftovers under the config's runs directory, by policy
    (finished runs: after the config's checkpoint.cleanup_after_days unless `older_than_days`);
    with `remote` ("s3://BUCKET/PREFIX", credentials from the AWS_* variables) the store's runs too."""
    log = get_run_logger()
    store = ObjectStore.at(remote)
    plan = plan_for_config(config, older_than_days=older_than_days, remote=store)
    rows = summary_rows(plan)
    verb = "would free" if dry_run else "frees"
    md = f"## Cleanup of {config.runs_dir}\n\n"
    if rows:
        md += markdown_table(CLEANUP_HEADERS, rows) + f"\n\n{verb} {format_size(plan.total_bytes)}\n"
    else:
        md += "nothing to clean\n"
    if plan.remote is not None:
        md += (f"\n## Cleanup of {plan.remote.location}\n\n" + markdown_table(REMOTE_HEADERS, remote_rows(plan.remote, format_size))
               + f"\n\n{verb} {format_size(plan.remote.bytes_to_free)} on the store\n"
               + "".join(f"\n- skipped {s.what}: {s.reason}" for s in plan.remote.skipped))
    if dry_run or (not plan.items and (plan.remote is None or plan.remote.empty)):
        best_effort("cleanup artifact", create_markdown_artifact, markdown=md, key=artifact_key("cleanup", config.run_name),
                    description=f"{len(plan.items)} items, {verb} {format_size(plan.total_bytes)}" if plan.items
                    else "nothing to clean")
        log.info(f"cleanup: {len(plan.items)} items, {verb} {format_size(plan.total_bytes)}")
        return CleanupResult.not_applied(plan) if dry_run else CleanupResult(planned_bytes=0)
    result = apply_cleanup(plan)
    md += f"\nfreed {format_size(result.bytes_freed)} ({len(result.deleted)} items)\n"
    md += "".join(f"\n- skipped {s.path}: {s.reason}" for s in result.skipped)
    best_effort("cleanup artifact", create_markdown_artifact, markdown=md, key=artifact_key("cleanup", config.run_name),
                description=f"freed {format_size(result.bytes_freed)} ({len(result.deleted)} items)")
    for err in result.errors:
        log.warning(f"cleanup: {err}")
    log.info(f"cleanup freed {format_size(result.bytes_freed)} ({len(result.deleted)} items)")
    if result.remote is not None:
        log.info(f"cleanup of {plan.remote.location if plan.remote else 'the store'}: deleted "
                 f"{len(result.remote.deleted)} checkpoints ({format_size(result.remote.bytes_freed)}), aborted "
                 f"{len(result.remote.aborted)} stale multipart uploads")
    return result
