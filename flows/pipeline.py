"""The training pipeline as one Prefect flow, step for step DESIGN.md's pipeline:

    disk preflight -> cleanup of stale checkpoints -> resumable training (retried, checkpointed)
      -> evaluation -> V1/V2 comparison and decision -> promotion -> notification

Started by the nightly deployment, by `prefect deployment run 'farense-training/nightly'`, or
without any server by `farense run v2` (Prefect's ephemeral local API). After a crash the resume
automation (deployments/setup.py) starts the deployment again with resume_attempt + 1; training
resumes from the last checkpoint, and steps whose results are on disk (training finished with
this config, evaluation of these adapters) are not redone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags

from farense.config import ExperimentConfig, load_config
from farense.disk.cleanup import CleanupResult
from farense.errors import ResumeLimitReached
from farense.model.demos import DEMO_OVERLAYS, demo_overlay, overlays_for
from farense.release.decision import PRODUCTION
from farense.run.layout import RESOLVED_CONFIG_FILE
from farense.run.outcome import TrainingOutcome
from tasks.common import TASK_TAG, tag_flow_run
from tasks.decide import DecisionResult, decide_task
from tasks.disk import PreflightResult, cleanup_task, preflight_task
from tasks.evaluate import EvaluationResult, evaluate_task
from tasks.inputs import check_inputs_task
from tasks.notify import NotifyResult, notify_task, send_notification
from tasks.promote import PromotionResult, promote_task
from tasks.train import train_model

TRAINING_FLOW = "farense-training"


@dataclass(frozen=True)
class PipelineResult:
    """What one pipeline run did, step by step (the flow's return value)."""

    config: str
    run_dir: str
    preflight: PreflightResult
    cleanup: CleanupResult
    training: TrainingOutcome
    evaluation: EvaluationResult
    decision: DecisionResult | None  # None: left to the calling campaign (runs trained side by side)
    promotion: PromotionResult
    notification: NotifyResult


def training_run_name() -> str:
    """Flow run names say what ran: config, demo, date, and which resume it is."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    config = Path(str(p.get("config", "v2")))
    name = config.parent.name if config.name == RESOLVED_CONFIG_FILE else config.stem  # a campaign's resolved file
    demo = f"-{demo_overlay(p.get('demo'))}" if p.get("demo") else ""
    resume = f"-resume{p['resume_attempt']}" if p.get("resume_attempt") else ""
    return f"{name}{demo}-{datetime.now():%Y-%m-%d-%H%M}{resume}"


def refuse_endless_resumes(resume_attempt: int, max_resume_attempts: int) -> None:
    """Bound the crash -> resume loop: past the limit this run fails (Failed, not Crashed: no resume)."""
    if resume_attempt > max_resume_attempts:
        raise ResumeLimitReached(
            f"this run was resumed {resume_attempt - 1} times after crashes (max_resume_attempts="
            f"{max_resume_attempts}); not resuming again. Look at the crashed runs' logs, then start the "
            f"deployment by hand (resume_attempt=0) to continue from the last checkpoint."
        )


def _tag_flow_run(config: ExperimentConfig) -> None:
    """Tags in the UI, as the deployments give them: farense, training, which config, which demo model."""
    tag_flow_run(TASK_TAG, "training", f"config:{config.name}", *[o for o in config.overlays if o in DEMO_OVERLAYS])


def completion_message(cfg: ExperimentConfig, t: TrainingOutcome, e: EvaluationResult, d: DecisionResult | None,
                       p: PromotionResult) -> tuple[str, str]:
    """Subject and body of the completion notification: the decision and the key metrics."""
    from prefect.runtime import flow_run

    outcome = "promoted" if p.promoted else "not promoted"
    subject = f"farense: {flow_run.name or cfg.run_name} completed, {outcome}"
    reading = t.gap_at_best
    gap = ("-" if t.train_val_gap is None else f"{t.train_val_gap:+.4f} ({t.gap_status})" if reading is None
           else f"{reading.describe()} ({t.gap_status})")
    best = "-" if t.best_val_loss is None else f"{t.best_val_loss:.4f} at step {t.best_step}"
    lines = [
        f"config: {cfg.name} (fingerprint {cfg.fingerprint})",
        f"training: {t.state.value}, step {t.step}/{t.total_steps}"
        + (f", resumed from step {t.resumed_from}" if t.resumed_from else "")
        + (" (already trained)" if t.skipped else ""),
        f"best validation loss: {best}",
        f"train/validation gap at the best step: {gap}",
        f"F1 {e.f1:.4f}, precision {e.precision:.4f}, recall {e.recall:.4f}, exact match {e.exact_match:.4f}"
        f" on {e.examples} test examples",
        f"compared with: {d.incumbent or 'nothing in production yet'}" if d else "compared with: (the campaign decides)",
        f"decision: {d.verdict if d else 'left to the calling campaign'}",
        f"promotion: {p.reason}" + (f" (release {p.release_id})" if p.release_id else ""),
        f"run directory: {t.run_dir}",
    ]
    return subject, "\n".join(lines)


def notify_failure_outside_deployments(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure hook for runs without a deployment (`farense run`): deployment runs are covered
    by the notify automation, so they are not told twice."""
    if flow_run.deployment_id is not None:
        return
    import logging

    params = flow_run.parameters or {}
    send_notification(params.get("notify_block"), f"farense: {flow_run.name} failed",
                      f"farense run {flow_run.name} failed.\nconfig: {params.get('config')}\nmessage: {state.message}",
                      logging.getLogger("farense.flows"))


@flow(name=TRAINING_FLOW, flow_run_name=training_run_name, retries=0,
      on_failure=[notify_failure_outside_deployments])
def training_flow(
    config: str = "v2",
    compare_with: str = PRODUCTION,
    promote: bool = True,
    demo: bool | str = False,
    workspace: str | None = None,
    notify_block: str | None = None,
    notify: bool = True,
    resume_attempt: int = 0,
    max_resume_attempts: int = 3,
    side_by_side_with: list[str] | None = None,
) -> PipelineResult:
    """Train `config`, evaluate it, compare it with `compare_with` ("production" or a run such as
    "v1"), promote it if the rules allow and `promote` is set, and say how it went (unless `notify`
    is off: a campaign tells once, at its end).

    `side_by_side_with`: the configs (resolved files) a campaign trains at the same time as this one.
    The preflight counts their disk and memory, the training takes one of that many machine slots
    with its share of the cores, and the decision is left to the campaign: the run this one is
    compared with may still be training."""
    refuse_endless_resumes(resume_attempt, max_resume_attempts)
    cfg = check_inputs_task(config, overlays_for(demo), workspace, compare_with)
    _tag_flow_run(cfg)
    if resume_attempt:
        get_run_logger().info(f"resume attempt {resume_attempt} of {max_resume_attempts} after a crash")

    beside = [load_config(c, workspace=cfg.workspace) for c in side_by_side_with or []]  # resolved files

    with tags("farense", f"config:{cfg.name}"):
        preflight = preflight_task(cfg, alongside=beside)
        cleanup = cleanup_task(cfg)
        trained = train_model(cfg, slots=1 + len(beside))
        evaluation = evaluate_task(cfg, trained.run_dir)
        decision: DecisionResult | None = None
        if beside:
            promotion = PromotionResult(False, None, None, "left to the calling campaign")
        else:
            decision = decide_task(cfg, trained.run_dir, compare_with)
            promotion = promote_task(cfg, trained.run_dir, decision, promote)
        subject, body = completion_message(cfg, trained, evaluation, decision, promotion)
        notification = (notify_task(subject, body, notify_block) if notify
                        else NotifyResult(False, None, "left to the calling flow"))

    return PipelineResult(cfg.name, trained.run_dir, preflight, cleanup, trained, evaluation, decision, promotion,
                          notification)


if __name__ == "__main__":
    training_flow()
