"""Campaign steps: the base model's evaluation (what fine-tuning must beat) and the V1/V2 choice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from farense.config import ExperimentConfig
from farense.release.campaign import (
    CampaignDecision,
    CampaignEntry,
    base_report_path,
    campaign_markdown,
    choose_winner,
    table_rows,
    write_campaign,
)
from farense.run.fsutil import sha256_file

from .common import artifact_key, best_effort, read_json, step
from .decide import DecisionResult

CURVES_PNG = "campaign_curves.png"


@dataclass(frozen=True)
class BaseEvaluation:
    report_path: str
    f1: float
    skipped: bool = False


@step("evaluate-base-model")
def evaluate_base_task(config: ExperimentConfig) -> BaseEvaluation:
    """Score the base model without adapters, unless this model was already scored on this test file."""
    from farense.release.evaluation import evaluate_base_model

    log = get_run_logger()
    path = base_report_path(config.runs_dir)
    old = read_json(path)
    test_file = config.data_dir / "test.jsonl"
    if (old and old.get("model_path") == config.model_path and test_file.is_file()
            and old.get("test_file", {}).get("sha256") == sha256_file(test_file)):
        log.info(f"base model already evaluated on this test split (F1 {old['summary']['f1']:.4f}); not again")
        return BaseEvaluation(str(path), old["summary"]["f1"], skipped=True)
    report = evaluate_base_model(config, path, log=log.info)
    s = report["summary"]
    log.info(f"base model (no adapters): F1 {s['f1']:.4f}, exact match {s['exact_match']:.4f}, "
             f"test loss {s['test_loss']:.4f}")
    return BaseEvaluation(str(path), s["f1"])


@step("choose-winner")
def campaign_decide_task(runs_dir: str, entries: list[CampaignEntry], timings: dict[str, float]) -> CampaignDecision:
    """The seed's rules over the configs in order; the table and the reasons go to files and the UI."""
    decision = choose_winner(entries)
    base = read_json(base_report_path(Path(runs_dir)))
    rows = table_rows(base, entries)
    write_campaign(Path(runs_dir), rows, decision, entries, timings)
    best_effort("campaign artifact", create_markdown_artifact, markdown=campaign_markdown(rows, decision),
                key=artifact_key("campaign", *[e.name for e in entries]), description=decision.verdict)
    get_run_logger().info(f"campaign: {decision.verdict}")
    return decision


def winner_decision(decision: CampaignDecision) -> DecisionResult:
    """The winner's own decision, in the form the promote task takes."""
    from farense.release.decision import read_decision

    d = read_decision(Path(decision.winner_decision or ""))
    return DecisionResult(d.verdict, d.promote, d.preferred, d.ready, None, decision.winner_decision or "",
                          tuple(r.name for r in d.failed_rules))


@step("train-trial", tags=["farense-train"])
def train_trial_task(config: ExperimentConfig, stop_at_step: int) -> int:
    """Train or resume one campaign trial until the rung's step (stopped there like a preemption);
    the newest checkpoint's step afterwards."""
    from farense.release.trials import RunProgress, train_in_process
    from farense.train.supervisor import one_training_on_this_machine

    log = get_run_logger()
    with one_training_on_this_machine(log.info, config.run_name):  # the pool's one training per machine
        train_in_process(config, stop_at_step, log=log.info)
    step_now = RunProgress.read(config).checkpoint_step
    log.info(f"{config.run_name}: checkpoint at step {step_now} (asked for {stop_at_step})")
    return step_now


@step("campaign-report")
def campaign_report_task(outcome: Any, f1: dict[str, float] | None = None) -> str:
    """The halving campaign's table and one PNG of every trial's validation curve (stopped ones marked),
    as Prefect artifacts; the PNG's path."""
    from prefect.artifacts import create_table_artifact

    from farense.release.trials import campaign_curves, campaign_table, stopped_at_step
    from farense.run.plots import plot_campaign_curves

    spec = outcome.spec
    winner = outcome.winner.name if outcome.winner else None
    png = plot_campaign_curves(campaign_curves(spec), stopped_at_step(outcome), spec.directory / CURVES_PNG,
                               title=f"campaign {spec.name}", winner=winner)
    rows = [{"trial": r["trial"], "params": _params_text(r["params"]), "rung reached": r["rung"],
             "best val loss": r["best_val_loss"], "gap": r["gap"], "F1": (f1 or {}).get(r["trial"]), "status": r["status"]}
            for r in campaign_table(spec)]
    key = artifact_key("halving", spec.name)
    best_effort("campaign table artifact", create_table_artifact, table=rows, key=key,
                description=f"campaign {spec.name}: winner {winner or '-'}")
    best_effort("campaign curves artifact", create_markdown_artifact, key=artifact_key("halving-curves", spec.name),
                markdown=f"# campaign {spec.name}: validation curves\n\n![validation curves]({png.as_uri()})\n\n"
                         f"[{png}]({png.as_uri()}); dashed and marked x: stopped at a rung.\n",
                description="every trial's validation loss, the stopped ones marked")
    return str(png)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def trainings_at_once(parallel: int | str, configs: list[ExperimentConfig]) -> tuple[int, str]:
    """How many of the campaign's trainings run side by side on this machine (farense.train.supervisor
    decides from the device, the cores and the memory one run needs), and why."""
    import os

    from farense.disk.estimate import estimate_run
    from farense.disk.preflight import MEMORY_OVERHEAD
    from farense.model.compute import current_device, device_memory_bytes
    from farense.train.supervisor import trainings_side_by_side

    device = current_device()
    if parallel in (1, "1") or len(configs) <= 1 or device != "cpu":
        return trainings_side_by_side(parallel, len(configs), device=device, cores=1)
    est = estimate_run(configs[0])
    weights = est.model_parameters * 4 if est.model_parameters else est.model_memory_bytes  # fp32 on a CPU
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return trainings_side_by_side(parallel, len(configs), device=device, cores=cores,
                                  available_bytes=device_memory_bytes(device),
                                  run_bytes=int(weights * MEMORY_OVERHEAD) if weights else None)
