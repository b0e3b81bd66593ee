"""`farense evaluate | compare | promote | rollback | releases`: from trained run to production.

RUN is a run directory or a config name (its run directory: `runs/<name>`, with --demo the demo
overlay's). compare writes comparison.json/.md and decision.json into the candidate's (B's)
evaluation directory; RUN_A may also be `production` (the release production/current points at).
promote uses the candidate's decision.json when it was made from the run's current evaluation,
and otherwise decides against what production serves now.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import orjson

from farense.commands import add_demo_flags
from farense.config import (
    ExperimentConfig,
    config_from_json,
    current_workspace,
    load_config,
)
from farense.console import print_table
from farense.errors import FarenseError
from farense.release.decision import compare_and_decide, load_incumbent, report_from_run
from farense.release.evaluation import evaluate_run
from farense.release.promotion import (
    current_release,
    current_target,
    ensure_decision,
    list_releases,
    promote,
    rollback,
)
from farense.run.layout import RunPaths


def _overlays(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "overlay", None) or [])


def resolve_run(spec: str, args: argparse.Namespace) -> tuple[Path, ExperimentConfig]:
    """A run directory and its config from a path or a config name."""
    p = Path(spec)
    if p.is_dir() and RunPaths(p).config.is_file():
        return p.resolve(), config_from_json(RunPaths(p).config)
    if p.is_dir():
        raise FarenseError(f"{p} is not a run directory (no config.json in it)")
    if os.sep in spec or (os.altsep and os.altsep in spec) or spec in (".", ".."):
        raise FarenseError(f"no run directory at {p} (RUN is a run directory or a config name)")
    cfg = load_config(spec, overlays=_overlays(args))
    if not RunPaths(cfg.run_dir).config.is_file():
        hint = "".join(f" --{o}" for o in _overlays(args) if o in ("demo", "tiny"))
        raise FarenseError(f"no run of {cfg.name} at {cfg.run_dir} (train it first: farense train {spec}{hint})")
    return cfg.run_dir, config_from_json(RunPaths(cfg.run_dir).config)


def _production_dir(args: argparse.Namespace, config: ExperimentConfig | None = None) -> Path:
    """--production, else the config's production_dir in the current workspace (never the one a run recorded)."""
    if getattr(args, "production", None):
        return Path(args.production)
    if config is not None:
        return config.resolve_in(current_workspace(), config.output.production_dir)
    return load_config(getattr(args, "config", None) or "v2", overlays=_overlays(args)).production_dir


def _print_json(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


# --------------------------------------------------------------------------- evaluate


def evaluate(args: argparse.Namespace) -> int:
    run_dir, config = resolve_run(args.run, args)
    if args.max_new_tokens:
        config = config.with_overrides(evaluation={"max_new_tokens": args.max_new_tokens})
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr))
    s = evaluate_run(run_dir, config=config, max_examples=args.max_examples, log=log)
    if args.json:
        _print_json(s.to_dict())
        return 0
    rows = [["examples", s.examples], ["F1", f"{s.f1:.4f}"], ["precision", f"{s.precision:.4f}"],
            ["recall", f"{s.recall:.4f}"], ["exact match", f"{s.exact_match:.4f}"],
            ["F1 of mean P/R (seed's way)", f"{s.f1_of_means:.4f}"],
            ["test loss", "-" if s.test_loss is None else f"{s.test_loss:.4f}"],
            ["test perplexity", "-" if s.test_perplexity is None else f"{s.test_perplexity:.2f}"]]
    print_table(f"evaluation of {s.run_name}", ["metric", "value"], rows)
    print(f"report: {s.report_path}")
    for p in (s.summary_csv, *s.plots):
        print(f"        {p}")
    return 0


# --------------------------------------------------------------------------- compare


def _load_incumbent(spec: str, args: argparse.Namespace, candidate_config: ExperimentConfig):
    prod = _production_dir(args, candidate_config)
    inc = load_incumbent(spec, prod, lambda name: resolve_run(name, args)[0])
    if inc is None:
        raise FarenseError(f"nothing in production yet ({prod}/current does not exist): promote a run first")
    return inc


def compare_cmd(args: argparse.Namespace) -> int:
    b_dir, b_config = resolve_run(args.run_b, args)
    a = _load_incumbent(args.run_a, args, b_config)
    b = report_from_run(b_dir)
    out = compare_and_decide(a, b, b_config.decision, out_dir=RunPaths(b_dir).evaluation)
    assert out.comparison is not None
    if args.json:
        _print_json({"comparison": out.comparison.to_json(), "decision": out.decision.to_json()})
        return 0
    headers, rows = out.comparison.table()
    print_table(f"{headers[1]} vs {headers[2]}", headers, rows)
    print_table("decision rules", ["rule", "condition", "result", "explanation"],
                [[r.name, r.comparison, "pass" if r.passed else "FAIL", r.explanation] for r in out.decision.rules])
    print(out.decision.verdict)
    for p in out.files.values():
        print(f"wrote {p}")
    return 0


# --------------------------------------------------------------------------- promote / rollback


def promote_cmd(args: argparse.Namespace) -> int:
    run_dir, config = resolve_run(args.run, args)
    paths = RunPaths(run_dir)
    prod = _production_dir(args, config)
    if args.decision:
        decision_path = Path(args.decision)
    else:
        choice = ensure_decision(run_dir, prod, config.decision)
        decision_path, d = choice.path, choice.decision
        if choice.reused:
            vs = d.incumbent["name"] if d.incumbent else "no incumbent"
            print(f"using {decision_path} ({paths.name} vs {vs}, decided {d.decided_at})")
        else:
            vs = f"production release {d.incumbent['release_id']}" if d.incumbent else "no release in production"
            print(f"decided {paths.name} against {vs}: {d.verdict}")
    before = current_release(prod)
    rel = promote(run_dir, decision_path, prod, force=args.force)
    if before is not None and rel.id == before.id:
        print(f"{paths.name}'s adapters are already in production: {rel.id}")
        return 0
    if rel.forced:
        print("promoted despite the decision (--force):", file=sys.stderr)
        for r in rel.manifest.get("refusal_overridden", []):
            print(f"  - {r}", file=sys.stderr)
    print(f"promoted {paths.name}: {prod}/current -> releases/{rel.id}"
          + (f" (previous: {rel.previous}; `farense rollback` switches back)" if rel.previous else ""))
    return 0


def rollback_cmd(args: argparse.Namespace) -> int:
    prod = _production_dir(args)
    before = current_release(prod)
    rel = rollback(prod, to=args.to)
    print(f"rolled back {prod}/current: {before.id if before else '-'} -> {rel.id}")
    return 0


def releases_cmd(args: argparse.Namespace) -> int:
    """Every release, the current one marked by where production/current points (whatever its manifest says)."""
    prod = _production_dir(args)
    target = current_target(prod)
    rels = list_releases(prod)
    is_current = {r.id: target is not None and Path(os.path.realpath(r.path)) == target for r in rels}
    if args.json:
        _print_json([{"id": r.id, "current": is_current[r.id], "run_name": r.run_name,
                      "created_at": r.created_at, "previous": r.previous, "forced": r.forced,
                      "metrics": r.metrics, "path": str(r.path)} for r in rels])
    else:
        rows = [["*" if is_current[r.id] else "", r.id, r.run_name, _f4(r.metrics.get("f1")),
                 r.previous or "-", "yes" if r.forced else ""] for r in rels]
        print_table(f"releases in {prod}", ["current", "id", "run", "F1", "previous", "forced"], rows)
    if target is not None and not any(is_current.values()):
        print(f"farense: warning: {prod}/current points at {target}, which is none of the releases listed; "
              "`farense rollback --to ID` switches it to one", file=sys.stderr)
    return 0


def _f4(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


# --------------------------------------------------------------------------- wiring


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlay", action="append", help="Overlay to apply when RUN is a config name, repeatable.")
    add_demo_flags(p)


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="Evaluate a run's best adapters on the test split (loss, F1, plots).")
    e.add_argument("run", help="Run directory or config name.")
    e.add_argument("--max-examples", type=int, help="Evaluate only the first N test examples.")
    e.add_argument("--max-new-tokens", type=int, help="Override evaluation.max_new_tokens.")
    e.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    _common(e)
    e.set_defaults(handler=evaluate)

    c = sub.add_parser("compare", help="Compare two evaluated runs and decide with the config's rules.")
    c.add_argument("run_a", help="Incumbent: run directory, config name, or 'production'.")
    c.add_argument("run_b", help="Candidate: run directory or config name (its evaluation dir gets the files).")
    c.add_argument("--json", action="store_true", help="Print comparison and decision as JSON.")
    c.add_argument("--production", help="Production directory for 'production' (default: the candidate's config).")
    _common(c)
    c.set_defaults(handler=compare_cmd)

    p = sub.add_parser("promote", help="Make a run's adapters the production release (atomic, reversible).")
    p.add_argument("run", help="Run directory or config name.")
    p.add_argument("--decision", help="decision.json to follow (default: the run's, or a new one against production).")
    p.add_argument("--force", action="store_true", help="Promote even when the decision says no.")
    p.add_argument("--production", help="Production directory (default: the run's config output.production_dir).")
    _common(p)
    p.set_defaults(handler=promote_cmd)

    r = sub.add_parser("rollback", help="Switch production back to the release before the current one.")
    r.add_argument("config", nargs="?", default="v2", help="Config whose production_dir to use (default v2).")
    r.add_argument("--to", help="Release id to switch to instead of the previous one.")
    r.add_argument("--production", help="Production directory (overrides the config's).")
    _common(r)
    r.set_defaults(handler=rollback_cmd)

    ls = sub.add_parser("releases", help="List production releases, marking the current one.")
    ls.add_argument("config", nargs="?", default="v2", help="Config whose production_dir to use (default v2).")
    ls.add_argument("--production", help="Production directory (overrides the config's).")
    ls.add_argument("--json", action="store_true")
    _common(ls)
    ls.set_defaults(handler=releases_cmd)
