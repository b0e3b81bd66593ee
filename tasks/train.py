"""The training task: farense.train.supervisor runs the trainer; this adds Prefect retries and observability.

Only failures a retry can cure are retried (farense.codes decides which); progress becomes a
progress artifact, checkpoints become `farense.checkpoint.saved` events, the summary a table.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from farense.config import ExperimentConfig
from farense.disk.cleanup import free_space_now
from farense.run.layout import RunPaths
from farense.run.outcome import TrainingOutcome
from farense.run.summary import TrainingSummary
from farense.train.supervisor import TrainingWatcher, train_in_subprocess

from .common import artifact_key, best_effort, step

RETRIES = 3
RETRY_DELAYS = [10, 30, 60]  # seconds, jittered by Prefect (retry_jitter_factor)


def retry_only_curable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry preemption, disk pauses, locks and kills, nothing else."""
    return bool(getattr(state.data, "retryable", False))


def _watcher(config: ExperimentConfig, paths: RunPaths, pid: int, log: Any) -> TrainingWatcher:
    """A watcher whose progress is a keyed progress artifact (a bar in the UI) and whose checkpoints are
    events of this flow run (one resource per run, not per config)."""
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    artifact = best_effort("progress artifact", create_progress_artifact, 0.0,
                           key=artifact_key("training-progress", config.run_name),
                           description=f"{config.run_name}: starting")

    def progress(pct: float, description: str) -> None:
        if artifact is not None:
            best_effort("progress update", update_progress_artifact, artifact, pct, description=description)

    resource = {"prefect.resource.id": f"farense.run.{flow_run.id or paths.root}",
                "prefect.resource.name": f"{flow_run.name or paths.name}: {paths.name}",
                "farense.run-dir": str(paths.root), "farense.config": config.name}

    def checkpoint(step: int) -> None:
        best_effort("checkpoint event", emit_event, event="farense.checkpoint.saved", resource=resource,
                    payload={"step": step, "run_dir": str(paths.root)})

    return TrainingWatcher(paths, pid, log.info, on_checkpoint=checkpoint, on_progress=progress)


@step("train", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=0.5,
      retry_condition_fn=retry_only_curable, tags=["farense-train"])
def train_model(config: ExperimentConfig, slots: int = 1) -> TrainingOutcome:
    """Train or resume `config`; skipped when this exact config already finished training. `slots` > 1:
    it trains beside up to slots - 1 others on this machine (farense.train.supervisor)."""
    log = get_run_logger()
    outcome = train_in_subprocess(
        config, log=log.info, error_log=log.error, free_disk_space=lambda: free_space_now(config),
        watcher_for=lambda paths, pid: _watcher(config, paths, pid, log),
        keep_watching=lambda poll: best_effort("watching the run", poll), slots=slots)
    _summary_artifact(config)
    return outcome


def _summary_artifact(config: ExperimentConfig) -> None:
    """training_summary.json as a table in the UI, the gap beside the two losses it is made of."""
    summary = TrainingSummary.read(RunPaths(config.run_dir).summary)
    if summary is None:
        return
    gap = "" if summary.train_val_gap is None else f", gap {summary.train_val_gap:+.4f} {summary.gap_status}"
    best_effort("training summary artifact", create_markdown_artifact, markdown=summary.to_markdown(config.overfitting),
                key=artifact_key("training-summary", config.run_name),
                description=f"{summary.state} at step {summary.final_step}/{summary.total_steps}{gap}")
