"""The training task: farense.training_job runs the trainer; this adds Prefect retries and observability.

Only failures a retry can cure are retried (farense.outcome decides which); progress becomes a
progress artifact, checkpoints become `farense.checkpoint.saved` events, the summary a table.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from farense.cleanup import free_space_now
from farense.config import ExperimentConfig
from farense.console import markdown_table
from farense.layout import RunPaths
from farense.outcome import TrainingOutcome
from farense.summary import TrainingSummary
from farense.training_job import TrainingWatcher, train_in_subprocess

from .common import artifact_key, best_effort

RETRIES = 3
RETRY_DELAYS = [10, 30, 60]  # seconds, jittered by Prefect (retry_jitter_factor)


def retry_only_curable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry preemption, disk pauses, locks and kills, nothing else."""
    return bool(getattr(state.data, "retryable", False))


def _watcher(paths: RunPaths, pid: int, log: Any) -> TrainingWatcher:
    """A watcher whose progress is a Prefect progress artifact and whose checkpoints are events."""
    from prefect.events import emit_event

    artifact = best_effort("progress artifact", create_progress_artifact, 0.0,
                           description=f"Training {paths.name}: starting")

    def progress(pct: float, description: str) -> None:
        if artifact is not None:
            best_effort("progress update", update_progress_artifact, artifact, pct, description=description)

    def checkpoint(step: int) -> None:
        best_effort("checkpoint event", emit_event, event="farense.checkpoint.saved",
                    resource={"prefect.resource.id": f"farense.run.{paths.name}", "prefect.resource.name": paths.name},
                    payload={"step": step, "run_dir": str(paths.root)})

    return TrainingWatcher(paths, pid, log.info, on_checkpoint=checkpoint, on_progress=progress)


@task(name="train", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=0.5,
      retry_condition_fn=retry_only_curable, tags=["farense-train"], cache_policy=NO_CACHE)
def train_model(config: ExperimentConfig, demo: bool | str = False) -> TrainingOutcome:
    """Train or resume `config`; skipped when this exact config already finished training."""
    log = get_run_logger()
    outcome = train_in_subprocess(
        config, demo=demo, log=log.info, error_log=log.error, free_disk_space=lambda: free_space_now(config),
        watcher_for=lambda paths, pid: _watcher(paths, pid, log),
        keep_watching=lambda poll: best_effort("watching the run", poll))
    _summary_artifact(config)
    return outcome


SUMMARY_FIELDS = (
    ("state", "state"), ("final_step", "steps"), ("best_step", "best step"), ("best_val_loss", "best validation loss"),
    ("train_val_gap", "train/validation gap at best"), ("gap_status", "gap status"), ("early_stopped", "early stopped"),
    ("final_train_loss", "final train loss"), ("final_val_loss", "final validation loss"),
    ("training_time_seconds", "training time (s)"), ("tokens_seen", "tokens seen"), ("adapters", "adapters"),
)


def _summary_artifact(config: ExperimentConfig) -> None:
    """training_summary.json as a table in the UI."""
    found = TrainingSummary.read(RunPaths(config.run_dir).summary)
    summary = found.to_json() if found is not None else {}

    def show(v: Any) -> Any:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else v

    rows = [[label, show(summary.get(k))] for k, label in SUMMARY_FIELDS]
    best_effort(
        "training summary artifact", create_markdown_artifact,
        markdown=f"## Training summary: {config.run_name}\n\n" + markdown_table(["", "value"], rows),
        key=artifact_key("training-summary", config.run_name),
        description=f"How training of {config.run_name} ended",
    )
