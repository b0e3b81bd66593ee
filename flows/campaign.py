"""A campaign as one Prefect flow: the seed's V1 and V2 trained one after the other, then chosen between.

    check every config -> evaluate the base model -> train + evaluate V1 (a subflow: the whole
      training pipeline) -> train + evaluate V2, decided against V1 (a subflow) -> choose the
      winner by the seed's rules -> promote it if it is ready -> notification

One training at a time (the subflows run in order) unless `parallel` > 1: then up to that many
pipelines run at once, each training in its own machine slot with its share of the cores (on a CPU,
where MLX's element-wise work uses one core, two trainings side by side finish sooner than one
after the other), and the decisions follow in config order once every run is evaluated: the same
decisions, from the same numbers. `farense run v1 v2 --demo` runs it on the real demo model with
Prefect's embedded API; the `campaign` deployment runs it from a server.
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, tags

from farense.model.demos import overlays_for
from farense.release.campaign import CampaignDecision, CampaignEntry, decision_path_of
from farense.train.inputs import write_resolved_config
from flows.pipeline import PipelineResult, training_flow
from tasks.campaign import (
    BaseEvaluation,
    campaign_decide_task,
    evaluate_base_task,
    trainings_at_once,
    winner_decision,
)
from tasks.common import TASK_TAG, tag_flow_run
from tasks.decide import decide_task
from tasks.inputs import check_inputs_task
from tasks.notify import NotifyResult, notify_task
from tasks.promote import PromotionResult, promote_task

CAMPAIGN_FLOW = "farense-campaign"


@dataclass(frozen=True)
class CampaignResult:
    """What the campaign did: the base model's score, each config's pipeline, the choice, promotion."""

    configs: list[str]
    runs_dir: str
    base: BaseEvaluation
    runs: list[PipelineResult]
    decision: CampaignDecision
    promotion: PromotionResult
    notification: NotifyResult
    stage_seconds: dict[str, float]


def campaign_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"campaign-{p.get('name') or '-'.join(p.get('configs') or [])}-{datetime.now():%Y-%m-%d-%H%M}"


@flow(name=CAMPAIGN_FLOW, flow_run_name=campaign_run_name, retries=0)
def campaign_flow(
    configs: list[str] = ["v1", "v2"],  # noqa: B006 - Prefect parameters are copied per run
    demo: bool | str = False,
    workspace: str | None = None,
    promote: bool = True,
    notify_block: str | None = None,
    name: str | None = None,
    parallel: int | str = 1,
) -> CampaignResult:
    """Train each config (each decided against the one before it), choose, promote, tell.
    `configs` are names or files (a campaign file's trials come as resolved files, `name` the campaign's);
    each is known by its run's name, the one the next config is decided against. `parallel`: how many
    pipelines run at once (1: in order; "auto": as the machine allows, see trainings_at_once)."""
    log, timings = get_run_logger(), {}
    clock = time.monotonic()

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()
        log.info(f"stage {stage}: {timings[stage]:.1f} s")

    tag_flow_run(TASK_TAG, "training", "campaign")
    # Every config resolved and checked before any training; each pipeline trains from that resolved file.
    cfgs = [check_inputs_task(c, overlays_for(demo), workspace) for c in configs]
    resolved = [str(write_resolved_config(c)) for c in cfgs]
    lap("check inputs")
    with tags("farense", "campaign"):
        base = evaluate_base_task(cfgs[0])
        lap("base model evaluation")
        compare = [str(cfgs[i - 1].run_dir) if i else "production" for i in range(len(cfgs))]
        at_once, why = trainings_at_once(parallel, cfgs)
        log.info(f"trainings: {why}")
        runs: list[PipelineResult] = []
        if at_once <= 1:
            for i, config in enumerate(resolved):
                runs.append(training_flow(config=config, workspace=workspace, promote=False, notify=False,
                                          compare_with=compare[i]))
                lap(f"{cfgs[i].run_name} pipeline")
        else:
            runs = pipelines_side_by_side(resolved, workspace, at_once, log.info)
            lap(f"{' + '.join(c.run_name for c in cfgs)} pipelines side by side")
            runs = [replace(r, decision=decide_task(c, r.run_dir, compare[i]))
                    for i, (c, r) in enumerate(zip(cfgs, runs))]
        entries = [CampaignEntry(c.run_name, r.run_dir, decision_path_of(r.run_dir)) for c, r in zip(cfgs, runs)]
        decision = campaign_decide_task(str(cfgs[0].runs_dir), entries, timings)
        winner = next((c for c in cfgs if c.run_name == decision.winner), None)
        if winner is None:
            promotion = PromotionResult(False, None, None, decision.verdict)
        else:
            promotion = promote_task(winner, decision.winner_run_dir, winner_decision(decision), promote)
        lap("decision and promotion")
        notification = notify_task(f"farense campaign {' vs '.join(c.run_name for c in cfgs)}: {decision.verdict}",
                                   "\n".join([decision.verdict, *decision.reasons, f"promotion: {promotion.reason}"]),
                                   notify_block)
    return CampaignResult([c.run_name for c in cfgs], str(cfgs[0].runs_dir), base, runs, decision, promotion,
                          notification, timings)


def pipelines_side_by_side(resolved: list[str], workspace: str | None, parallel: int,
                           log: Callable[[str], None]) -> list[PipelineResult]:
    """Each config's pipeline (a subflow, the decision left to the campaign), `parallel` at a time, each in
    its own thread with the flow's context; a failed one fails the campaign once the others have ended
    (their trainings stay resumable either way)."""
    at_once = min(parallel, len(resolved))

    def pipeline(i: int) -> PipelineResult:
        started = time.monotonic()
        others = [c for j, c in enumerate(resolved) if j != i][: at_once - 1]
        result = training_flow(config=resolved[i], workspace=workspace, promote=False, notify=False,
                               side_by_side_with=others)
        log(f"{Path(result.run_dir).name} pipeline: {time.monotonic() - started:.1f} s (side by side)")
        return result

    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="farense-pipeline") as pool:
        futures = [pool.submit(contextvars.copy_context().run, pipeline, i) for i in range(len(resolved))]
        failures = [f.exception() for f in futures]
    for failure in failures:
        if failure is not None:
            raise failure
    return [f.result() for f in futures]


if __name__ == "__main__":
    campaign_flow()
