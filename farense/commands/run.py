"""`farense run CONFIG`: the whole pipeline as a Prefect flow, with no server to start.

Prefect's ephemeral local API (SQLite under PREFECT_HOME) records the run unless PREFECT_API_URL
points at a server. farense/ never imports Prefect itself: this module imports flows.pipeline,
which does, only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys


def run(args: argparse.Namespace) -> int:
    # No traffic leaves the machine, whatever the user's Prefect profile says about telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # A bad config fails here, in a second, before Prefect and its local API start; the flow
    # checks again (model, data) as its first task.
    from ..config import check_inputs, load_config

    config = load_config(args.config, overlays=["demo"] if args.demo else [])
    if not args.demo:  # the demo model is built by the flow's first task
        check_inputs(config)
    from flows.pipeline import training_flow

    state = training_flow(
        config=args.config,
        compare_with=args.compare_with,
        promote=not args.no_promote,
        demo=args.demo,
        workspace=os.environ.get("FARENSE_WORKSPACE"),
        notify_block=args.notify_block,
        return_state=True,
    )
    if state.is_completed():
        result = state.result()
        t, e, d, p = result.training, result.evaluation, result.decision, result.promotion
        print(f"{result.config}: {t.state.value} at step {t.step}/{t.total_steps}"
              + (f" (resumed from {t.resumed_from})" if t.resumed_from else "")
              + (" (already trained)" if t.skipped else ""))
        print(f"F1 {e.f1:.4f}  gap {t.train_val_gap if t.train_val_gap is None else round(t.train_val_gap, 4)}"
              f" ({t.gap_status})")
        print(f"decision: {d.verdict}")
        print(f"promotion: {p.reason}" + (f" (release {p.release_id})" if p.release_id else ""))
        print(f"run directory: {result.run_dir}")
        return 0
    error = state.result(raise_on_failure=False)
    print(f"farense: {state.name}: {state.message}", file=sys.stderr)
    return int(getattr(error, "exit_code", 1) or 1)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="Run the whole pipeline (preflight, cleanup, train, evaluate, decide, promote, notify).")
    p.add_argument("config", help="Config name (configs/NAME.toml) or path.")
    p.add_argument("--demo", action="store_true", help="On the tiny offline demo model (built if missing).")
    p.add_argument("--compare-with", default="production",
                   help="What to compare with: 'production' (the current release, default) or a run such as v1.")
    p.add_argument("--no-promote", action="store_true", help="Decide, but never promote.")
    p.add_argument("--notify-block", help="Prefect notification block to tell, as SLUG/NAME (e.g. slack-webhook/team).")
    p.set_defaults(handler=run)
