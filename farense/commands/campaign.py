"""`farense campaign run FILE` and `farense campaign status FILE`: successive halving over N configs.

`run` trains the campaign's trials on this machine, one at a time, rung by rung (the decision log
in the campaign directory makes it resumable: run the same command again after any crash), then
sends the winner through the pipeline's evaluation, the seed's decision rules and promotion
(its training is already done, so the pipeline does not train it again).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from farense.commands import add_demo_flags, add_parallel_flag, call_flow, local_prefect_env
from farense.commands.run import run_list_campaign
from farense.console import print_table
from farense.model.demos import prepare_overlay_models
from farense.release.campaign_file import CampaignSpec, load_campaign
from farense.release.trials import campaign_message, campaign_status, log_path, run_campaign, trained_steps
from farense.train.inputs import write_resolved_config

STATUS_HEADERS = ("trial", "params", "rung reached", "best val loss", "steps", "status")


def _spec(args: argparse.Namespace) -> CampaignSpec:
    overlays = list(dict.fromkeys(args.overlay or []))
    if len(overlays) > 1:
        print("farense: error: --demo and --tiny exclude each other", file=sys.stderr)
        raise SystemExit(2)
    return load_campaign(args.file, overlays=overlays, workspace=os.environ.get("FARENSE_WORKSPACE"))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return ", ".join(f"{k.split('.')[-1]}={x:g}" if isinstance(x, float) else f"{k.split('.')[-1]}={x}"
                         for k, x in v.items())
    return str(v)


def print_status(spec: CampaignSpec) -> None:
    rows = [[_fmt(r[k]) for k in ("trial", "params", "rung", "best_val_loss", "steps", "status")]
            for r in campaign_status(spec)]
    if not spec.halves:
        print_table(f"campaign {spec.name} (no halving: every trial trains fully, in order)", STATUS_HEADERS, rows)
        print(f"steps trained: {trained_steps(spec)}")
        return
    print_table(f"campaign {spec.name} (rungs at steps {', '.join(map(str, spec.rungs))}, eta {spec.eta})",
                STATUS_HEADERS, rows)
    full = len(spec.trials) * spec.budget
    steps = trained_steps(spec)
    print(f"steps trained: {steps} of {full} for {len(spec.trials)} full trainings ({100 * steps / full:.0f}%)")
    print(f"decision log: {log_path(spec)}")


def status(args: argparse.Namespace) -> int:
    print_status(_spec(args))
    return 0


def run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if not spec.halves:  # the simplest campaign: every trial fully, in order, as `farense run A B` does
        refs = [str(write_resolved_config(t.config)) for t in spec.trials]
        return run_list_campaign(spec, refs, False, promote=spec.promote and not args.no_promote,
                                 notify_block=args.notify_block or os.environ.get("FARENSE_NOTIFY_BLOCK"),
                                 parallel=args.parallel)
    prepare_overlay_models(spec.trials[0].config)
    outcome = run_campaign(spec, log=lambda m: print(m, flush=True))
    print_status(spec)
    winner = outcome.winner
    stops = ", ".join(f"{n} at rung {r} (step {spec.rungs[r]})" for r, n in outcome.stopped_per_rung.items())
    print(f"winner: {winner.name if winner else '-'}; stopped: {stops or 'none'}")
    _notify(args, *campaign_message(outcome))
    if winner is None or args.no_final:
        return 0
    return _final(args, spec, winner)


def _notify(args: argparse.Namespace, subject: str, body: str) -> None:
    """Through the pipeline's notify path, when a block is named (--notify-block or FARENSE_NOTIFY_BLOCK);
    a notification that cannot be delivered is reported, never fatal."""
    block = args.notify_block or os.environ.get("FARENSE_NOTIFY_BLOCK")
    if not block:
        return
    import logging

    from tasks.notify import send_notification

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    send_notification(block, subject, body, logging.getLogger("farense.campaign"))


def _final(args: argparse.Namespace, spec: CampaignSpec, winner: Any) -> int:
    """The winner through evaluation, the seed's rules against `compare_with`, promotion if ready."""
    local_prefect_env()
    from flows.pipeline import training_flow

    result, code = call_flow(training_flow, config=str(write_resolved_config(winner.config)),
                             compare_with=spec.compare_with, promote=spec.promote and not args.no_promote,
                             workspace=winner.config.workspace, notify=False)
    if code:
        return code
    print(f"{winner.name}: F1 {result.evaluation.f1:.4f}; decision: {result.decision.verdict}")
    print(f"promotion: {result.promotion.reason}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("campaign", help="Campaigns: N configs, losers stopped early by successive halving.")
    csub = p.add_subparsers(dest="campaign_command", metavar="ACTION", required=True)
    r = csub.add_parser("run", help="Run (or resume) a campaign file, then evaluate, decide and promote the winner.")
    r.add_argument("file", help="Campaign file (configs/campaigns/NAME.toml).")
    add_demo_flags(r)
    r.add_argument("--no-promote", action="store_true", help="Decide, but never promote.")
    add_parallel_flag(r, "A campaign without [halving]: ")
    r.add_argument("--no-final", action="store_true", help="Stop after choosing the winner (no evaluation).")
    r.add_argument("--notify-block", help="Prefect notification block told the winner and the stops, as SLUG/NAME "
                                          "(else FARENSE_NOTIFY_BLOCK; none: not sent).")
    r.set_defaults(handler=run)
    s = csub.add_parser("status", help="The campaign's table from its decision log and runs.")
    s.add_argument("file")
    add_demo_flags(s)
    s.set_defaults(handler=status)
