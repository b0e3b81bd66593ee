"""run_state.json: what a run is doing now, for the monitor, `farense status` and the flows."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from .states import RunState


def write_run_state(path: Path, state: RunState, *, durable: bool = True, **fields: Any) -> None:
    """Replace the state file atomically (readers never see half a file).

    Per-step updates pass durable=False: renamed into place but not fsynced, since resume reads
    checkpoints, not this file, and an fsync per optimizer step costs real time on slow disks.
    """
    from .fsutil import atomic_write_bytes

    payload = {
        "state": state.value,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "updated_at": time.time(),
        **fields,
    }
    data = orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    if durable:
        atomic_write_bytes(path, data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_run_state(path: Path) -> dict[str, Any] | None:
    try:
        return orjson.loads(Path(path).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
