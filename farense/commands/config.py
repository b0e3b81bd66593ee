"""`farense config show|diff|check`: see and compare resolved configs without loading a model."""

from __future__ import annotations

import argparse
import sys

import orjson

from farense.commands import add_demo_flags
from farense.commands.observe import register_config_import
from farense.config import config_to_toml, diff_configs, load_config
from farense.console import print_table
from farense.train.inputs import check_experiment


def _load(name: str, args: argparse.Namespace):
    return load_config(name, overlays=args.overlay or [])


def show(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args)
    if args.json:
        payload = cfg.to_dict() | {"fingerprint": cfg.fingerprint, "chain": list(cfg.chain)}
        sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"# resolved from: {' <- '.join(reversed(cfg.chain))}")
    print(f"# training fingerprint: {cfg.fingerprint}")
    print(config_to_toml(cfg), end="")
    return 0


def diff(args: argparse.Namespace) -> int:
    a, b = _load(args.a, args), _load(args.b, args)
    rows = diff_configs(a, b)
    if args.json:
        sys.stdout.write(orjson.dumps([{"key": k, "a": x, "b": y} for k, x, y in rows], option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not rows:
        print(f"{a.name} and {b.name} are identical")
        return 0
    print_table(f"{a.name} -> {b.name}", ["key", a.name, b.name], [[k, repr(x), repr(y)] for k, x, y in rows])
    same = a.fingerprint == b.fingerprint
    print(f"training fingerprint: {a.fingerprint} {'==' if same else '!='} {b.fingerprint}")
    return 0


def check(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args)
    report = check_experiment(cfg, probe_writes=False).report
    for s in report.splits.values():
        print(f"{s.name:6} {s.examples:6d} examples  format={s.format}  ({s.path})")
    print(f"{cfg.name}: config, model path and data are valid (fingerprint {cfg.fingerprint})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="Show, compare and check experiment configs.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    s = csub.add_parser("show", help="Print the resolved config (after extends and overlays).")
    s.add_argument("config", help="Config name (configs/NAME.toml) or path.")
    s.add_argument("--overlay", action="append", help="Overlay to apply (configs/overlays/NAME.toml), repeatable.")
    add_demo_flags(s)
    s.add_argument("--json", action="store_true", help="Machine-readable output.")
    s.set_defaults(handler=show)

    d = csub.add_parser("diff", help="Print the fields that differ between two configs.")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--overlay", action="append")
    add_demo_flags(d)
    d.add_argument("--json", action="store_true")
    d.set_defaults(handler=diff)

    c = csub.add_parser("check", help="Validate a config, its model path and its data, loading nothing heavy.")
    c.add_argument("config")
    c.add_argument("--overlay", action="append")
    add_demo_flags(c)
    c.set_defaults(handler=check)

    register_config_import(csub)
