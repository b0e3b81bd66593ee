"""A halving campaign (configs/campaigns/*.toml) as one Prefect flow: `farense campaign run` in Prefect.

    load the campaign file -> loop: the rung decisions (farense.release.halving over the durable
      decision log campaign_log.json, exactly as the command) -> the next trial trained to its rung
      (a subflow `farense-campaign-trial`; its training task holds the machine's training lock) ->
      ... until a winner -> the winner through the training pipeline (a subflow: evaluation, decision,
      promotion; its training is already done) -> the campaign table and the validation-curves PNG
      as artifacts -> notification

Resumable the same way as the command: a crashed or cancelled flow run started again reads the log
and each trial's own run files, and goes on; no trial is trained backwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger, tags

from farense.config import ExperimentConfig
from farense.errors import FarenseError
from farense.model.demos import overlays_for, prepare_overlay_models
from farense.release.campaign_file import load_campaign
from farense.release.trials import campaign_message, finalists, run_campaign, run_campaign_parallel
from farense.train.inputs import write_resolved_config
from flows.pipeline import training_flow
from tasks.campaign import campaign_report_task, train_trial_task
from tasks.common import TASK_TAG, tag_flow_run
from tasks.evaluate import evaluate_task
from tasks.inputs import check_inputs_task
from tasks.notify import NotifyResult, notify_task

HALVING_FLOW = "farense-campaign-halving"
TRIAL_FLOW = "farense-campaign-trial"


@dataclass(frozen=True)
class HalvingResult:
    campaign: str
    winner: str | None
    stopped_per_rung: dict[int, int]
    curves_png: str
    notification: NotifyResult
    winner_f1: float | None = None


@flow(name=TRIAL_FLOW, flow_run_name="{trial}-to-step-{stop_at_step}", retries=0)
def campaign_trial_flow(config: str, stop_at_step: int, workspace: str | None = None, trial: str = "trial") -> int:
    """One trial trained (or resumed) to a rung's step, from its resolved config file."""
    cfg = check_inputs_task(config, [], workspace)
    with tags("farense", f"config:{cfg.name}"):
        return train_trial_task(cfg, stop_at_step)


@flow(name=HALVING_FLOW, retries=0)
def campaign_halving_flow(campaign: str, demo: bool | str = False, workspace: str | None = None,
                          notify_block: str | None = None, final_pipeline: bool = True,
                          promote: bool = True, trial_deployment: str | None = None,
                          parallel: int = 1) -> HalvingResult:
    """Successive halving over the campaign file's trials, one trial training at a time; resumable. With
    `final_pipeline`, the winner is evaluated, decided on against the file's `compare_with`, and promoted
    if ready (and `promote` and the file's `promote` allow it), as `farense campaign run` does. With
    `trial_deployment` (a deployment of `farense-campaign-trial`, "FLOW/NAME"), each trial is a run of
    it and up to `parallel` run at once on the pool's workers (sharing this file system)."""
    log = get_run_logger()
    tag_flow_run(TASK_TAG, "training", "campaign")
    spec = load_campaign(campaign, overlays=overlays_for(demo), workspace=workspace)
    prepare_overlay_models(spec.trials[0].config)

    def train(config: ExperimentConfig, stop_at_step: int) -> None:
        params = dict(config=str(write_resolved_config(config)), stop_at_step=stop_at_step, workspace=workspace,
                      trial=config.run_name)
        if trial_deployment is None:
            campaign_trial_flow(**params)
            return
        from prefect.deployments import run_deployment

        run = run_deployment(name=trial_deployment, parameters=params, as_subflow=True)  # waits for its end
        if run.state is None or not run.state.is_completed():
            raise RuntimeError(f"{config.run_name}: trial run {run.name} ended {run.state and run.state.name}")

    if trial_deployment is None:
        outcome = run_campaign(spec, train=train, log=log.info)
    else:  # the deployment's workers train up to `parallel` trials at once, each holding its machine's lock
        outcome = run_campaign_parallel(spec, train=train, slots=max(1, parallel), log=log.info)
    winner = outcome.winner
    final = None
    if winner is not None and final_pipeline:
        # The winner through the pipeline (its training is done: evaluation, the seed's rules, promotion).
        final = training_flow(config=str(write_resolved_config(winner.config)), compare_with=spec.compare_with,
                              promote=spec.promote and promote, workspace=workspace, notify=False)
    f1 = {winner.name: final.evaluation.f1} if final else {}
    if final is not None:  # the other finalists on the same test split: how close the last comparison was
        for t in finalists(outcome):
            if t.name == winner.name:
                continue
            try:
                f1[t.name] = evaluate_task(t.config, str(t.config.run_dir)).f1
            except FarenseError as e:  # e.g. no best adapters yet: the table says '-', the campaign stands
                log.warning(f"{t.name}: finalist not evaluated: {e}")
    png = campaign_report_task(outcome, f1 or None)
    subject, body = campaign_message(outcome)
    if final is not None:
        body += f"\n{winner.name}: F1 {final.evaluation.f1:.4f}; {final.decision.verdict}; {final.promotion.reason}"
    log.info(body)
    notification = notify_task(subject, body, notify_block)
    return HalvingResult(spec.name, winner.name if winner else None, outcome.stopped_per_rung, png, notification,
                         final.evaluation.f1 if final else None)
