"""Fault-injection points for the crash tests: a named place in the trainer where a test process
can be made to stop and wait, so that a real SIGKILL lands exactly there.

Inactive unless FARENSE_FAULT="<point>:<step>" is set in the environment (tests only).
FARENSE_FAULT="<point>:<step>:raise" raises a RuntimeError there instead (a bug's exception), and
FARENSE_FAULT_RANK=N limits either to rank N of a launched job.
FARENSE_BARRIER="<point>:<n>:<dir>" makes n processes wait for each other at a named point (a race
made certain, e.g. two promotions reading production/current before either moves it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def fault_point(name: str, step: int) -> None:
    """If this is the requested point, announce it (stderr and FARENSE_FAULT_MARKER) and wait to be killed."""
    want = os.environ.get("FARENSE_FAULT")
    if not want or want not in (f"{name}:{step}", f"{name}:{step}:raise"):
        return
    only = os.environ.get("FARENSE_FAULT_RANK")
    if only is not None and only != os.environ.get("MLX_RANK", "0"):
        return
    if want.endswith(":raise"):
        raise RuntimeError(f"FARENSE-FAULT-POINT {name}:{step}: an injected error (a stand-in for a bug)")
    marker = os.environ.get("FARENSE_FAULT_MARKER")
    if marker:
        Path(marker).write_text(f"{name}:{step}:{os.getpid()}\n")
    print(f"FARENSE-FAULT-POINT {name}:{step} pid={os.getpid()}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def barrier(name: str, timeout_s: float = 60.0) -> None:
    """If FARENSE_BARRIER names this point, check in (a file in its directory) and wait until n processes have."""
    want = os.environ.get("FARENSE_BARRIER", "")
    point, _, rest = want.partition(":")
    if point != name:
        return
    count, _, directory = rest.partition(":")
    Path(directory, str(os.getpid())).write_text(name)
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(directory)) < int(count) and time.monotonic() < deadline:
        time.sleep(0.01)
