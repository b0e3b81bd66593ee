"""Campaign steps: the base model's evaluation (what fine-tuning must beat) and the V1/V2 choice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
