"""Preemption and parent death: the edges where the OS talks to the trainer."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# SIGHUP: the terminal or ssh session that started the run went away; stop as resumable, like SIGTERM.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class PreemptionFlag:
    """Set by SIGTERM, SIGINT or SIGHUP; the loop polls it after each optimizer step, checkpoints and exits.

    `hold()` blocks these signals in the main thread (and so in every thread started after it, MLX's
    included) until the first `poll()`: a blocked signal waits instead of being dropped, and MLX's first
    compile runs `g++ --version` through system(), which ignores SIGINT meanwhile.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._held = False

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        """The signal's name (SIGHUP), for messages."""
        return signal.Signals(self.signal).name if self.signal is not None else "none"

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signal = signum

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            # A second Ctrl-C means "now": give the default behaviour back.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.signal = signum

    def install(self) -> "PreemptionFlag":
        """Install handlers when called from the main thread (Prefect runs tasks in threads); a SIGHUP
        ignored by whoever started us (nohup) stays ignored."""
        if _in_main_thread():
            for s in PREEMPTION_SIGNALS:
                if s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN:
                    continue
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def hold(self) -> "PreemptionFlag":
        """Keep preemption signals waiting (never lost) until the first poll(): start-up, where MLX compiles."""
        if _in_main_thread() and not self._held:
            signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
            self._held = True
        return self

    def release(self) -> None:
        """Deliver what waited during hold(): Python runs the handler before this returns."""
        if self._held:
            self._held = False
            signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)

    def poll(self) -> bool:
        """Whether a stop was requested, counting signals that arrived while held."""
        self.release()
        return self.requested

    def restore(self) -> None:
        self.release()  # while our handlers are still installed: a held signal is recorded, not lost
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def kept_from_new_threads() -> Iterator[None]:
    """Threads started inside (native ones too: OpenBLAS starts its pool as it loads) inherit a mask
    that blocks the preemption signals, so the kernel hands those to the main thread, where Python
    handles them, and never to a thread that would drop them while system() ignores SIGINT."""
    if not _in_main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
