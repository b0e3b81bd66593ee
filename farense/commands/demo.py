"""`farense demo init DIR`: build the tiny offline demo model and copy the sample data."""

from __future__ import annotations

import argparse


def init(args: argparse.Namespace) -> int:
    from ..demo import demo_init_command

    return demo_init_command(args.directory, force=args.force)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="The offline demo model and data.")
    dsub = p.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    i = dsub.add_parser("init", help="Build the tiny demo model and copy the sample dataset (offline).")
    i.add_argument("directory", nargs="?", default=".farense/demo", help="Target directory (default .farense/demo).")
    i.add_argument("--force", action="store_true", help="Rebuild even if a complete build exists.")
    i.set_defaults(handler=init)
