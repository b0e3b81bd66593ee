"""Evaluation: the run's best adapters on the test split (F1, exact match, test loss).

Skipped when the run already has a report made from this config and these exact adapters, so a
flow resumed after a crash does not evaluate twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from farense.config import ExperimentConfig
from farense.console import markdown_table
from farense.release.decision import REPORT_NAME
from farense.run.layout import RunPaths

from .common import artifact_key, best_effort, step


@dataclass(frozen=True)
class EvaluationResult:
    run_dir: str
    report_path: str
    examples: int
    f1: float
    precision: float
    recall: float
    exact_match: float
    test_loss: float | None
    skipped: bool = False


def existing_evaluation(config: ExperimentConfig, run_dir: Path) -> EvaluationResult | None:
    """The run's report, if it was made from this config and the adapters the run has now."""
    from farense.release.evaluation import current_report

    paths = RunPaths(Path(run_dir))
    report = current_report(config, paths.root)
    if report is None:
        return None
    s = report.get("summary", {})
    return EvaluationResult(str(paths.root), str(paths.evaluation / REPORT_NAME), int(s.get("examples", 0)),
                            s["f1"], s["precision"], s["recall"], s["exact_match"], s.get("test_loss"), skipped=True)


@step("evaluate")
def evaluate_task(config: ExperimentConfig, run_dir: str) -> EvaluationResult:
    """Evaluate the run (or reuse its matching report) and publish the metrics as an artifact."""
    from farense.release.evaluation import evaluate_run

    log = get_run_logger()
    result = existing_evaluation(config, Path(run_dir))
    if result is not None:
        log.info(f"{config.run_name} was already evaluated with these adapters (F1 {result.f1:.4f}); not again")
    else:
        s = evaluate_run(Path(run_dir), config=config, log=log.info)
        result = EvaluationResult(str(s.run_dir), str(s.report_path), s.examples, s.f1, s.precision, s.recall,
                                  s.exact_match, s.test_loss)
    rows = [["examples", result.examples], ["F1", f"{result.f1:.4f}"], ["precision", f"{result.precision:.4f}"],
            ["recall", f"{result.recall:.4f}"], ["exact match", f"{result.exact_match:.4f}"],
            ["test loss", "-" if result.test_loss is None else f"{result.test_loss:.4f}"]]
    best_effort(
        "evaluation artifact", create_markdown_artifact,
        markdown=f"## Evaluation: {config.run_name}\n\n" + markdown_table(["metric", "value"], rows)
        + f"\n\nreport: `{result.report_path}`\n",
        key=artifact_key("evaluation", config.run_name),
        description=f"F1 {result.f1:.4f} on {result.examples} test examples",
    )
    return result
