"""`farense cleanup` and `farense preflight`: see and free disk space before it runs out.

cleanup is a dry run unless --apply: it prints what would go and the bytes, and deletes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import orjson

from farense.commands import add_demo_flags
from farense.config import CheckpointConfig, format_size, load_config
from farense.console import print_table
from farense.disk.cleanup import (
    apply_cleanup,
    item_rows,
    plan_cleanup,
    referenced_models,
    summary_rows,
)
from farense.disk.preflight import (
    NEEDS_HEADERS,
    PREFLIGHT_HEADERS,
    needs_rows,
    preflight_rows,
)
from farense.disk.preflight import preflight as run_preflight
from farense.errors import DiskFull


def _dump(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def cleanup(args: argparse.Namespace) -> int:
    defaults = CheckpointConfig()
    keep_last, keep_best, older_than_days = defaults.keep_last, defaults.keep_best, defaults.cleanup_after_days
    if args.config:
        cfg = load_config(args.config, overlays=args.overlay or [])
        runs_dir, production_dir = cfg.runs_dir, cfg.production_dir
        keep_last, keep_best = cfg.checkpoint.keep_last, cfg.checkpoint.keep_best
        older_than_days = cfg.checkpoint.cleanup_after_days
    else:
        ws = Path(os.environ.get("FARENSE_WORKSPACE", "."))  # set by `farense --workspace`
        runs_dir = ws / (args.runs_dir or "runs")
        production_dir = ws / (args.production_dir or "production")
    if args.production_dir and args.config:
        production_dir = Path(args.production_dir)
    if args.keep_last is not None:
        keep_last = args.keep_last
    if args.older_than_days is not None:
        older_than_days = args.older_than_days
    refs = referenced_models(runs_dir) if args.hf_cache else set()
    plan = plan_cleanup(runs_dir, production_dir=production_dir, keep_last=keep_last, keep_best=keep_best,
                        older_than_days=older_than_days, include_hf_cache=args.hf_cache, referenced_models=refs)
    result = apply_cleanup(plan) if args.apply else None
    if args.json:
        _dump({"dry_run": not args.apply, "plan": plan.to_dict(),
               "result": result.to_dict() if result is not None else None})
        return 1 if result is not None and result.errors else 0

    verb = "deleted" if args.apply else "would delete"
    title = (f"cleanup of {runs_dir} (keep_last={keep_last}, best={'kept' if keep_best else 'not kept'}, "
             f"finished runs older than {older_than_days:g} days reduced)")
    if plan.items:
        if args.verbose:
            print_table(title, ["path", "kind", "size", "reason"], item_rows(plan))
        else:
            print_table(title, ["run", "kind", "count", "what", "size", "reason"], summary_rows(plan))
    else:
        print(f"{title}: nothing to delete")
    for s in plan.skipped:
        print(f"skipped {s.path}: {s.reason}")
    for s in plan.kept:
        print(f"kept {s.path}: {s.reason}")
    if result is None:
        print(f"dry run: {verb} {len(plan.items)} items, {format_size(plan.total_bytes)} "
              f"({plan.total_bytes} bytes); nothing was deleted. Run again with --apply to delete.")
        return 0
    for s in result.skipped:
        print(f"skipped {s.path}: {s.reason}")
    for e in result.errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"{verb} {len(result.deleted)} items: freed {format_size(result.bytes_freed)} ({result.bytes_freed} bytes)")
    return 1 if result.errors else 0


def preflight(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overlays=args.overlay or [])
    err: DiskFull | None = None
    try:
        report = run_preflight(cfg, allow_cleanup=not args.no_cleanup, older_than_days=args.older_than_days,
                               include_hf_cache=args.hf_cache, allow_network=args.online)
    except DiskFull as e:
        report = getattr(e, "report", None)
        if report is None:
            raise
        err = e
    if args.json:
        _dump(report.to_dict() | ({"error": str(err)} if err else {}))
    else:
        print_table(f"disk preflight: {cfg.name}", PREFLIGHT_HEADERS, preflight_rows(report))
        for row in report.rows:
            print_table(f"what the run needs on {row.filesystem}", NEEDS_HEADERS, needs_rows(report, row))
        if report.estimate.checkpoint_bytes is not None:
            print(f"one checkpoint: {format_size(report.estimate.checkpoint_bytes)} "
                  f"({report.estimate.lora_parameters:,} LoRA parameters)")
        if report.cleanup is not None:
            print(f"cleanup ran first: freed {format_size(report.cleanup.bytes_freed)}")
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
    if err is not None:
        print(f"farense: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("cleanup", help="Delete stale checkpoints, leftovers and old runs (dry run unless --apply).",
                       description="Plan (and with --apply, perform) the cleanup of a runs directory: keep the last "
                                   "K checkpoints and the best per run, reduce finished runs older than N days to "
                                   "their adapters and summary, remove leftovers of interrupted writes. Active runs "
                                   "and production are never touched.")
    where = c.add_mutually_exclusive_group()
    where.add_argument("config", nargs="?", help="Config whose runs_dir, production_dir and checkpoint policy to use.")
    where.add_argument("--runs-dir", help="Runs directory (default: ./runs).")
    c.add_argument("--production-dir", help="Production directory never to touch (default: the config's, or ./production).")
    c.add_argument("--overlay", action="append", help="Overlay for CONFIG, repeatable.")
    add_demo_flags(c)
    c.add_argument("--keep-last", type=int, help="Checkpoints kept per run besides the best (default: config's, or 3).")
    c.add_argument("--older-than-days", type=float,
                   help="Finished runs older than this keep only adapters and summary "
                        "(default: the config's checkpoint.cleanup_after_days, 30).")
    c.add_argument("--hf-cache", action="store_true", help="Also remove Hugging Face cache models no config refers to.")
    c.add_argument("--apply", action="store_true", help="Delete (default: dry run that deletes nothing).")
    c.add_argument("--json", action="store_true", help="Machine-readable output.")
    c.add_argument("-v", "--verbose", action="store_true", help="One row per item instead of per run and kind.")
    c.set_defaults(handler=cleanup)

    p = sub.add_parser("preflight", help="Estimate what a run will write and check free space and memory.")
    p.add_argument("config", help="Config name (configs/NAME.toml) or path.")
    p.add_argument("--overlay", action="append", help="Overlay to apply, repeatable.")
    add_demo_flags(p)
    p.add_argument("--no-cleanup", action="store_true", help="Report only; never run the cleanup policy when short.")
    p.add_argument("--older-than-days", type=float,
                   help="Cleanup policy for finished runs (default: the config's checkpoint.cleanup_after_days).")
    p.add_argument("--hf-cache", action="store_true", help="Let the cleanup policy include unused Hugging Face models.")
    p.add_argument("--online", action="store_true", help="Fetch a hub model's config.json when it is not cached.")
    p.add_argument("--json", action="store_true", help="Machine-readable output.")
    p.set_defaults(handler=preflight)
