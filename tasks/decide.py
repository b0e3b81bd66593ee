"""Compare the candidate with the incumbent (production, or another run such as V1) and decide.

The rules are farense.release.decision's (the seed's): gap below max_gap, F1 at least min_f1, F1 not
meaningfully below the incumbent's. decision.json and comparison.md go into the candidate's
evaluation directory; the Prefect UI gets the comparison table and the decision as artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from farense.config import ExperimentConfig, load_config
from farense.release.decision import (
    PRODUCTION,
    compare_and_decide,
    load_incumbent,
    report_from_run,
)
from farense.run.layout import RunPaths

from .common import artifact_key, best_effort, step


@dataclass(frozen=True)
class DecisionResult:
    verdict: str
    promote: bool
    preferred: bool
    ready: bool
    incumbent: str | None  # what the candidate was compared with; None: nothing in production yet
    decision_path: str
    failed_rules: tuple[str, ...] = ()


def config_run_dir(config: ExperimentConfig) -> Callable[[str], Path]:
    """How a config name given as compare_with becomes a run directory: with the overlays and workspace
    the candidate's resolved config records."""
    return lambda name: load_config(name, overlays=list(config.overlays), workspace=config.workspace).run_dir


@step("compare-and-decide")
def decide_task(config: ExperimentConfig, run_dir: str, compare_with: str = PRODUCTION) -> DecisionResult:
    """Decide whether the candidate run should replace the incumbent, and publish why."""
    log = get_run_logger()
    candidate = report_from_run(Path(run_dir))
    incumbent = load_incumbent(compare_with, config.production_dir, config_run_dir(config))
    out = compare_and_decide(incumbent, candidate, config.decision, out_dir=RunPaths(Path(run_dir)).evaluation)
    d = out.decision
    if out.comparison is not None:
        headers, rows = out.comparison.table()
        best_effort(
            "comparison artifact", create_table_artifact,
            table=[dict(zip(headers, r)) for r in rows],
            key=artifact_key("comparison", config.run_name),
            description=f"{headers[1]} vs {headers[2]}",
        )
    else:
        log.info(f"nothing to compare {config.run_name} with ({compare_with} is empty): the rules alone decide")
    best_effort("decision artifact", create_markdown_artifact, markdown=d.to_markdown(),
                key=artifact_key("decision", config.run_name), description=d.short_verdict)
    log.info(f"decision: {d.verdict}")
    inc_name = None if incumbent is None else (f"production ({incumbent.release_id})" if incumbent.kind == "release"
                                               else incumbent.name)
    return DecisionResult(d.verdict, d.promote, d.preferred, d.ready, inc_name, str(out.files["decision"]),
                          tuple(r.name for r in d.failed_rules))
