"""`farense status`: every run under a runs directory, and what production serves, in one table.

Built from the same reading of a run's files as the monitor (farense.monitor.snapshot, whose state
comes from farense.run.runstate), so the two never disagree about a state: a run whose state file says "running" but whose lock nobody holds
is shown as crashed, whatever the file says.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from farense.config import format_size
from farense.console import format_duration
from farense.errors import FarenseError
from farense.observe.monitor import MonitorSnapshot, snapshot
from farense.release.promotion import current_release
from farense.run.fsutil import dir_size, read_json_object
from farense.run.layout import RunPaths
from farense.run.locks import LockInfo, probe_lock
from farense.run.metrics import read_metrics
from farense.run.plots import plot_loss_curves
from farense.run.runstate import find_runs, pid_alive
from farense.run.summary import TrainingSummary

LOSS_PNG = "loss_curves.png"
RUN_HEADERS = ("run", "config", "state", "step", "best val loss", "gap status", "disk", "last activity")
PRODUCTION_HEADERS = ("release", "run", "config", "created", "F1", "fingerprint", "previous")


@dataclass(frozen=True)
class RunRow:
    """One run as `farense status` lists it."""

    name: str  # path relative to the runs directory (demo/v2 for runs/demo/v2)
    path: str
    config: str | None
    fingerprint: str | None
    state: str
    state_detail: str
    running: bool
    step: int
    total_steps: int | None
    best_val_loss: float | None
    best_step: int | None
    gap: float | None
    gap_status: str | None
    disk_bytes: int
    last_activity: float | None  # Unix seconds
    last_activity_utc: str | None

    def cells(self, now: float) -> list[str]:
        total = "?" if self.total_steps is None else str(self.total_steps)
        best = "-" if self.best_val_loss is None else f"{self.best_val_loss:.4f} @ {self.best_step}"
        age = "-" if self.last_activity is None else f"{format_duration(now - self.last_activity)} ago"
        return [self.name, self.config or "-", self.state_detail or self.state, f"{self.step}/{total}", best,
                self.gap_status or "-", format_size(self.disk_bytes), age]


@dataclass(frozen=True)
class ProductionRow:
    """The release production/current points at."""

    id: str
    run_name: str
    config_name: str
    created_at: str
    f1: float | None
    fingerprint: str
    previous: str | None
    forced: bool
    path: str

    def cells(self) -> list[str]:
        return [self.id, self.run_name, self.config_name or "-", self.created_at,
                "-" if self.f1 is None else f"{self.f1:.4f}", self.fingerprint or "-", self.previous or "-"]


@dataclass(frozen=True)
class StatusReport:
    runs_dir: str
    production_dir: str | None
    runs: tuple[RunRow, ...]
    production: ProductionRow | None
    production_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs_dir": self.runs_dir,
            "production_dir": self.production_dir,
            "runs": [asdict(r) for r in self.runs],
            "production": asdict(self.production) if self.production is not None else None,
            "production_error": self.production_error,
        }


def _utc(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")




def run_row(run_dir: Path, runs_dir: Path, *, now: float, usage: Callable[[Path], Any] | None = None,
            lock_probe: Callable[[Path], LockInfo] = probe_lock,
            alive: Callable[[int], bool] = pid_alive) -> RunRow:
    """One row from the run's files: the monitor's snapshot plus the summary's gap at the best step."""
    s: MonitorSnapshot = snapshot(run_dir, now=now, usage=usage, lock_probe=lock_probe, alive=alive)
    summary = TrainingSummary.read(RunPaths(run_dir).summary) or TrainingSummary()
    # A finished run is judged by its gap at the best step (what the seed reported); a live one by its last.
    gap, gap_status = s.gap, s.gap_status
    if summary.gap_status and not s.running:
        gap, gap_status = summary.train_val_gap, summary.gap_status
    best_val, best_step = s.best_val_loss, s.best_step
    if isinstance(summary.best_val_loss, (int, float)) and not s.running:
        best_val, best_step = float(summary.best_val_loss), summary.best_step
    try:
        name = str(run_dir.relative_to(runs_dir))
    except ValueError:
        name = run_dir.name
    return RunRow(
        name=name if name != "." else run_dir.name, path=str(run_dir), config=s.config_name,
        fingerprint=s.fingerprint, state=s.state, state_detail=s.state_detail, running=s.running, step=s.step,
        total_steps=s.total_steps, best_val_loss=best_val, best_step=best_step, gap=gap, gap_status=gap_status,
        disk_bytes=dir_size(run_dir), last_activity=s.updated_at, last_activity_utc=_utc(s.updated_at),
    )


def production_row(production_dir: Path) -> ProductionRow | None:
    """The current release, or None when nothing was promoted yet."""
    rel = current_release(production_dir)
    if rel is None:
        return None
    f1 = rel.metrics.get("f1")
    return ProductionRow(
        id=rel.id, run_name=rel.run_name, config_name=rel.config_name, created_at=rel.created_at,
        f1=float(f1) if isinstance(f1, (int, float)) and not isinstance(f1, bool) else None,
        fingerprint=rel.config_fingerprint, previous=rel.previous, forced=rel.forced, path=str(rel.path),
    )


def status_report(
    runs_dir: str | os.PathLike[str],
    production_dir: str | os.PathLike[str] | None = None,
    *,
    now: float | None = None,
    usage: Callable[[Path], Any] | None = None,
    lock_probe: Callable[[Path], LockInfo] = probe_lock,
    alive: Callable[[int], bool] = pid_alive,
) -> StatusReport:
    """Every run under `runs_dir` (sorted by name) and the production release."""
    now = time.time() if now is None else now
    root = Path(runs_dir)
    rows = tuple(run_row(p, root, now=now, usage=usage, lock_probe=lock_probe, alive=alive)
                 for p in find_runs(root))
    prod, err = None, None
    if production_dir is not None:
        try:
            prod = production_row(Path(production_dir))
        except FarenseError as e:  # a broken `current` is worth a line, not a traceback
            err = str(e)
    return StatusReport(str(root), str(production_dir) if production_dir is not None else None, rows, prod, err)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def plot_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
             warn: Callable[[str], None] = _stderr) -> Path:
    """The run's loss curves as a PNG (default <run>/plots/loss_curves.png), from its metrics and summary;
    lines that are not metrics rows are skipped, `warn` told their file:line."""
    paths = RunPaths(Path(run_dir))
    rows = read_metrics(paths.metrics_jsonl, warn=warn)
    if not rows:
        raise FarenseError(f"{paths.root}: no metrics to plot ({paths.metrics_jsonl} is missing or empty)")
    summary = {"run_name": paths.name, **(read_json_object(paths.summary) or {})}  # as written (plots take a dict)
    return plot_loss_curves(rows, summary, Path(out) if out else paths.plots / LOSS_PNG)
