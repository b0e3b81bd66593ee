"""`farense monitor | status | plot | export` and `farense config import`: watching runs and mlx-lm interop.

All read a run's files only (no Prefect, no lock taken). On a terminal they draw with rich; piped
into a file, CI or Prefect they print plain `key=value` lines or tab-separated tables, and `--json`
gives machine-readable output.

RUN is a run directory, a config name (its run directory; with --demo the demo overlay's) or, for
monitor, nothing: the run under ./runs (or --runs-dir) that wrote last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from farense.commands import add_demo_flags
from farense.config import load_config
from farense.console import print_table
from farense.errors import FarenseError
from farense.model.mlxlm_compat import export_adapters, fuse_run, import_lora_yaml
from farense.observe.monitor import resolve_run_dir, watch
from farense.observe.status import (
    PRODUCTION_HEADERS,
    RUN_HEADERS,
    plot_run,
    status_report,
)
from farense.run.fsutil import atomic_write_bytes


def _dump(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _workspace() -> Path:
    return Path(os.environ.get("FARENSE_WORKSPACE", "."))


def _run_dir(args: argparse.Namespace) -> Path:
    return resolve_run_dir(args.run, runs_dir=getattr(args, "runs_dir", None), overlays=args.overlay or [])


# --------------------------------------------------------------------------- monitor


def monitor_cmd(args: argparse.Namespace) -> int:
    if args.refresh <= 0:
        print("farense: error: --refresh must be a number of seconds > 0", file=sys.stderr)
        return 2
    run_dir = _run_dir(args)
    return watch(run_dir, refresh=args.refresh, once=args.once, as_json=args.json)


# --------------------------------------------------------------------------- status


def status_cmd(args: argparse.Namespace) -> int:
    ws = _workspace()
    if args.config:
        cfg = load_config(args.config, overlays=args.overlay or [])
        runs_dir, prod_dir = cfg.runs_dir, cfg.production_dir
    elif args.overlay and set(args.overlay) & {"demo", "tiny"}:
        which = "tiny" if "tiny" in args.overlay else "demo"
        runs_dir, prod_dir = ws / "runs" / which, ws / "production" / which
    else:
        runs_dir, prod_dir = ws / "runs", ws / "production"
    if args.runs_dir:
        runs_dir = Path(args.runs_dir)
    if args.production_dir:
        prod_dir = Path(args.production_dir)
    now = time.time()
    report = status_report(runs_dir, prod_dir, now=now)
    if args.json:
        _dump(report.to_dict())
        return 0
    if report.runs:
        print_table(f"runs in {runs_dir}", RUN_HEADERS, [r.cells(now) for r in report.runs])
    else:
        print(f"no runs in {runs_dir}")
    if report.production is not None:
        print_table(f"production ({prod_dir}/current)", PRODUCTION_HEADERS, [report.production.cells()])
    elif report.production_error:
        print(f"production: {report.production_error}", file=sys.stderr)
    else:
        print(f"production: nothing promoted yet ({prod_dir}/current does not exist)")
    return 0


# --------------------------------------------------------------------------- plot


def plot_cmd(args: argparse.Namespace) -> int:
    path = plot_run(_run_dir(args), args.out)
    if args.json:
        _dump({"plot": str(path)})
    else:
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- export


def export_cmd(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.json else (lambda m: None)
    if args.fuse:
        out = fuse_run(run_dir, args.out, dequantize=args.dequantize, force=args.force, log=log)
        use = f"mlx_lm.generate --model {out} --prompt ..."
    else:
        if args.dequantize:
            print("farense: error: --dequantize applies to --fuse only", file=sys.stderr)
            return 2
        out = export_adapters(run_dir, args.out, force=args.force)
        use = f"mlx_lm.generate --model BASE --adapter-path {out} --prompt ..."
    if args.json:
        _dump({"export": str(out), "fused": bool(args.fuse)})
    else:
        print(f"wrote {out}")
        print(f"use it with: {use}")
    return 0


# --------------------------------------------------------------------------- config import


def config_import_cmd(args: argparse.Namespace) -> int:
    imported = import_lora_yaml(args.yaml, name=args.name)
    text = imported.to_toml()
    if not args.out:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FarenseError(f"{out} already exists; pass --force to replace it")
    atomic_write_bytes(out, text.encode())
    for n in imported.notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"wrote {out} (config {imported.name!r}); check it with: farense config check {out}")
    return 0


def register_config_import(csub: argparse._SubParsersAction) -> None:
    """Add `import` to `farense config` (called by farense/commands/config.py)."""
    i = csub.add_parser("import", help="Turn an mlx-lm `lora` YAML config into a farense TOML config.",
                        description="Map every option mlx_lm.lora documents to farense's config (iters, "
                                    "steps_per_eval and save_every become optimizer steps), or refuse it with "
                                    "the reason. Prints the TOML, or writes it with --out.")
    i.add_argument("yaml", help="mlx-lm config file (the one `mlx_lm.lora -c` reads).")
    i.add_argument("--name", help="Config name (default: the YAML file's name).")
    i.add_argument("--out", help="Write the TOML here instead of printing it.")
    i.add_argument("--force", action="store_true", help="Replace --out if it exists.")
    i.set_defaults(handler=config_import_cmd)


# --------------------------------------------------------------------------- wiring


def _run_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    if optional:
        p.add_argument("run", nargs="?", help="Run directory or config name (default: the latest run).")
    else:
        p.add_argument("run", help="Run directory or config name.")
    p.add_argument("--overlay", action="append", help="Overlay to apply when RUN is a config name, repeatable.")
    add_demo_flags(p)


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("monitor", help="Watch a run live: progress, losses and gap, throughput, checkpoints, disk.",
                       description="A live view of a run read from its files (works without Prefect, while the "
                                   "run writes, and after it ended). Rich on a terminal; one key=value line per "
                                   "refresh elsewhere.")
    _run_args(m, optional=True)
    m.add_argument("--refresh", type=float, default=5.0, help="Seconds between refreshes (default 5).")
    m.add_argument("--once", action="store_true", help="Show one snapshot and exit.")
    m.add_argument("--runs-dir", help="Where to look for the latest run when RUN is omitted (default ./runs).")
    m.add_argument("--json", action="store_true", help="One JSON object per refresh.")
    m.set_defaults(handler=monitor_cmd)

    s = sub.add_parser("status", help="Table of all runs (state, step, best val loss, gap, disk) and production.")
    s.add_argument("config", nargs="?", help="Config whose runs_dir and production_dir to use.")
    s.add_argument("--runs-dir", help="Runs directory (default: ./runs, searched two levels deep).")
    s.add_argument("--production-dir", help="Production directory (default: ./production).")
    s.add_argument("--overlay", action="append", help="Overlay for CONFIG, repeatable.")
    add_demo_flags(s)
    s.add_argument("--json", action="store_true", help="Machine-readable output.")
    s.set_defaults(handler=status_cmd)

    p = sub.add_parser("plot", help="Draw a run's loss curves (PNG).")
    _run_args(p)
    p.add_argument("--out", help="PNG file to write (default RUN/plots/loss_curves.png).")
    p.add_argument("--json", action="store_true", help="Print the path as JSON.")
    p.set_defaults(handler=plot_cmd)

    e = sub.add_parser("export", help="Export a run's best adapters, or fuse them into a standalone model (--fuse).")
    _run_args(e)
    e.add_argument("--fuse", action="store_true", help="Fuse the adapters into the base model through mlx-lm.")
    e.add_argument("--out", help="Target directory (default RUN/export/fused_model or RUN/export/adapters).")
    e.add_argument("--dequantize", action="store_true", help="With --fuse: save a de-quantized model.")
    e.add_argument("--force", action="store_true", help="Replace the target if it exists.")
    e.add_argument("--json", action="store_true", help="Print the result as JSON.")
    e.set_defaults(handler=export_cmd)

