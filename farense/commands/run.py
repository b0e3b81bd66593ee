"""`farense run CONFIG [CONFIG ...]`: the whole pipeline as a Prefect flow, with no server to start.

One config runs the training pipeline; several (`farense run v1 v2 --demo`) run a campaign: each
trained in turn, decided against the one before it, the winner promoted if ready, and a table of
the base model against every config. Prefect's ephemeral local API (SQLite under PREFECT_HOME)
records the run unless PREFECT_API_URL points at a server. farense/ never imports Prefect itself:
this module imports the flows, which do, only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from farense.commands import add_demo_flags, add_parallel_flag, call_flow, local_prefect_env
from farense.config import load_config
from farense.console import print_table
from farense.model.demos import overlays_for
from farense.release.campaign_file import COMMAND_LINE, CampaignSpec, configs_campaign
from farense.release.campaign import (
    TABLE_HEADERS,
    CampaignEntry,
    base_report_path,
    decision_path_of,
    table_rows,
)
from farense.train.inputs import check_experiment


def run(args: argparse.Namespace) -> int:
    local_prefect_env()
    overlays = [o for o in (args.overlay or []) if o in ("demo", "tiny")]
    if len(set(overlays)) > 1:
        print("farense: error: --demo and --tiny exclude each other", file=sys.stderr)
        return 2
    demo: bool | str = overlays[0] if overlays else False
    _check_early(args.config, overlays_for(demo))
    started = time.monotonic()
    if len(args.config) == 1:
        return _pipeline(args, demo)
    code = _campaign(args, demo)
    print(f"total {time.monotonic() - started:.0f} s")
    return code


def _check_early(configs: list[str], overlays: tuple[str, ...]) -> None:
    """A bad config or bad data fails here, in a second, before Prefect and its local API start; the
    flow resolves and checks again as its first task, which also builds the demo model and data."""
    for name in configs:
        config = load_config(name, overlays=list(overlays))
        if not overlays:
            check_experiment(config, probe_writes=False)


def _pipeline(args: argparse.Namespace, demo: bool | str) -> int:
    from flows.pipeline import training_flow

    result, code = call_flow(training_flow, config=args.config[0], compare_with=args.compare_with,
                             promote=not args.no_promote, demo=demo, workspace=os.environ.get("FARENSE_WORKSPACE"),
                             notify_block=args.notify_block)
    if code:
        return code
    t, e, d, p = result.training, result.evaluation, result.decision, result.promotion
    print(f"{result.config}: {t.state.value} at step {t.step}/{t.total_steps}"
          + (f" (resumed from {t.resumed_from})" if t.resumed_from else "")
          + (" (already trained)" if t.skipped else ""))
    gap = t.gap_at_best
    print(f"F1 {e.f1:.4f}  " + (f"{gap.describe()} ({t.gap_status})" if gap is not None else "gap -"))
    print(f"decision: {d.verdict}")
    print(f"promotion: {p.reason}" + (f" (release {p.release_id})" if p.release_id else ""))
    print(f"run directory: {result.run_dir}")
    return 0


def _campaign(args: argparse.Namespace, demo: bool | str) -> int:
    """Several configs: the simplest campaign (no halving), each config trained fully in turn."""
    spec = configs_campaign(args.config, overlays=overlays_for(demo), workspace=os.environ.get("FARENSE_WORKSPACE"))
    return run_list_campaign(spec, list(args.config), demo, promote=not args.no_promote,
                             notify_block=args.notify_block, parallel=args.parallel)


def run_list_campaign(spec: CampaignSpec, refs: list[str], demo: bool | str, *, promote: bool,
                      notify_block: str | None, parallel: int | str = "auto") -> int:
    """A campaign without halving through the campaign flow: `refs` are what each trial's pipeline loads
    (config names with `demo` overlays, or resolved config files); prints base vs every trial."""
    local_prefect_env()  # before Prefect is imported: it reads its settings then
    from flows.campaign import campaign_flow

    assert not spec.halves and len(refs) == len(spec.trials)
    result, code = call_flow(campaign_flow, configs=refs, demo=demo, workspace=os.environ.get("FARENSE_WORKSPACE"),
                             promote=promote, notify_block=notify_block, parallel=parallel,
                             name=None if spec.source == COMMAND_LINE else spec.name)
    if code:
        return code
    entries = [CampaignEntry(n, r.run_dir, decision_path_of(r.run_dir)) for n, r in zip(result.configs, result.runs)]
    base = _read(base_report_path(result.runs_dir))
    print_table("base model vs " + " vs ".join(result.configs), TABLE_HEADERS, table_rows(base, entries))
    d, p = result.decision, result.promotion
    print(f"decision: {d.verdict}")
    for reason in d.reasons:
        print(f"  - {reason}")
    print(f"promotion: {p.reason}" + (f" (release {p.release_id})" if p.release_id else ""))
    print("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.stage_seconds.items()))
    print(f"campaign table: {result.runs_dir}/campaign.md")
    return 0


def _read(path: Any) -> dict[str, Any] | None:
    import orjson

    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())
    except OSError:
        return None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="Run the whole pipeline (preflight, cleanup, train, evaluate, decide, promote, "
                                   "notify); several configs run a campaign (e.g. `farense run v1 v2 --demo`).")
    p.add_argument("config", nargs="+", help="Config name (configs/NAME.toml) or path; several: a campaign, in order.")
    add_demo_flags(p)
    add_parallel_flag(p)
    p.add_argument("--compare-with", default="production",
                   help="One config: what to compare with, 'production' (the current release, default) or a run "
                        "such as v1. A campaign compares each config with the one before it.")
    p.add_argument("--no-promote", action="store_true", help="Decide, but never promote.")
    p.add_argument("--notify-block", help="Prefect notification block to tell, as SLUG/NAME (e.g. slack-webhook/team).")
    p.set_defaults(handler=run)
