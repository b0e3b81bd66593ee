"""Preemption and parent death: the edges where the OS talks to the trainer."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


class PreemptionFlag:
    """Set by SIGTERM/SIGINT; the loop checks it after each optimizer step, checkpoints and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signal = signum

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            # A second Ctrl-C means "now": give the default behaviour back.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.signal = signum

    def install(self) -> "PreemptionFlag":
        """Install handlers when called from the main thread (Prefect runs tasks in threads)."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when our parent dies (Linux), so an orphaned trainer never
    keeps the run lock after its Prefect flow process was killed. Elsewhere a watcher thread polls."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(137)
        return

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(137)

    threading.Thread(target=watch, daemon=True, name="farense-parent-watch").start()
