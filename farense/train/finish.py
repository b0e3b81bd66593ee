"""The end of a training: the seed's metrics files, training_summary.json, the loss curves, the final run state."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from farense.codes import RunState
from farense.config import ExperimentConfig
from farense.overfitting import classify_gap
from farense.run.layout import RunPaths
from farense.run.metrics import write_seed_files
from farense.run.outcome import TrainingOutcome
from farense.run.plots import plot_loss_curves
from farense.run.runstate import RunRecorder
from farense.run.summary import TrainingSummary
from farense.train.phases import PhaseClock
from farense.train.progress import TrainingProgress
from farense.train.setup import library_versions


def summarize(config: ExperimentConfig, paths: RunPaths, st: TrainingProgress, history: list[dict[str, Any]],
              total_steps: int, outcome: RunState, data_fp: str) -> TrainingSummary:
    """How the training ended, in the seed's terms: best step, its loss and gap, early stopping, time."""
    es = st.early_stopping
    best_row = next((r for r in history if r.get("step") == es.best_step and "val_loss" in r), {})
    last_val_row = next((r for r in reversed(history) if "val_loss" in r), {})
    gap_at_best = best_row.get("gap")
    return TrainingSummary(
        run_name=config.run_name, config_name=config.name, fingerprint=config.fingerprint, data_fingerprint=data_fp,
        state=outcome.value, final_step=st.step, total_steps=total_steps, best_step=es.best_step,
        best_val_loss=es.best_val_loss, train_loss_at_best=best_row.get("train_loss_window"),
        train_loss_steps_at_best=best_row.get("train_loss_window_steps"), train_val_gap=gap_at_best,
        gap_status=classify_gap(gap_at_best, config.overfitting).value if gap_at_best is not None else None,
        final_train_loss=last_val_row.get("train_loss_window"),
        final_train_loss_steps=last_val_row.get("train_loss_window_steps"), final_val_loss=st.last_val_loss,
        final_gap=st.last_gap, last_step_train_loss=history[-1]["train_loss"] if history else None,
        early_stopped=outcome is RunState.EARLY_STOPPED, early_stop_step=es.stopped_at,
        training_time_seconds=st.elapsed_seconds, tokens_seen=st.tokens_seen,
        best_checkpoint_step=st.best_checkpoint_step, adapters=str(paths.best_adapters),
        versions=library_versions(),
    )


def finish(config: ExperimentConfig, paths: RunPaths, st: TrainingProgress, history: list[dict[str, Any]], *,
           total_steps: int, resumed_from: int | None, outcome: RunState, message: str, data_fp: str,
           recorder: RunRecorder, log: Callable[[str], None], phases: PhaseClock | None = None) -> TrainingOutcome:
    """Write what a finished run leaves (rank 0) and return its outcome."""
    phases = phases or PhaseClock()
    summary = summarize(config, paths, st, history, total_steps, outcome, data_fp)
    if recorder.enabled:  # rank 0 writes
        write_seed_files(history, paths.metrics_json, paths.metrics_csv)
        phases.lap("finish_metrics_files")
        try:  # the loss curves (`farense plot RUN` redraws them); a plot never fails a finished run

            plot_loss_curves(history, summary.to_json(), paths.plots / "loss_curves.png")
        except Exception as e:
            log(f"warning: could not draw the loss curves in {paths.plots}: {e}")
        phases.lap("finish_plot")
        summary = dataclasses.replace(summary, phase_seconds=phases.rounded(), training_started_at=phases.started_at)
        summary.write(paths.summary)
        recorder.stopped(outcome, st.step, message)
    return TrainingOutcome.from_summary(paths.root, summary, message=message).with_(resumed_from=resumed_from)
