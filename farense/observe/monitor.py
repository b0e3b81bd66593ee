"""The live view of one run (monitor snapshot, rich and plain renderings), read only from its files.

`snapshot(run_dir, now=...)` gathers every field a person watches into a MonitorSnapshot; it is
pure apart from reading files, and the clock, the disk usage and the lock probe are parameters,
so tests drive it without waiting. `render` draws a snapshot for a terminal (rich), `plain_line`
for logs and CI (one `key=value` line), `watch` refreshes either until interrupted.

Files change under us while we read: metrics.jsonl may end in a torn line (ignored) or be replaced
by a resume (we read one version or the other), run_state.json is replaced atomically, and
checkpoints may be pruned between listing and reading (skipped). Nothing here raises on a file
that is missing or half written; the field is left empty instead.

What the run *is doing* comes from farense.run.runstate (run_state.json corrected by the run lock).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import orjson

from farense.codes import RunState
from farense.config import ExperimentConfig, config_from_json, format_size, load_config
from farense.console import format_duration
from farense.disk.diskguard import DiskGuard, Usage, disk_usage
from farense.errors import FarenseError
from farense.overfitting import GapReading
from farense.run.checkpoint import CheckpointStore
from farense.run.layout import RunPaths
from farense.run.locks import LockInfo, probe_lock
from farense.run.metrics import read_metrics
from farense.run.runstate import (
    effective_state,
    find_runs,
    is_run_dir,
    pid_alive,
    read_run_state,
    run_state_problem,
)
from farense.train.progress import (
    EARLY_STOPPING_KEY,
    PROGRESS_KEY,
    TOTAL_STEPS_KEY,
    read_saved_progress,
)

# Train-loss trend: mean of the last TREND_WINDOW steps against the mean of the window before.
TREND_WINDOW = 20
# A change smaller than this share of the loss is "flat".
FLAT_RELATIVE = 0.01
# A running run whose files have not changed for this long (and 20 steps' time) gets a warning.
STALL_SECONDS = 900.0


# --------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class MonitorSnapshot:
    """Everything the monitor shows about one run at one moment (None: not known yet)."""

    run_dir: str
    run_name: str
    taken_at: float
    config_name: str | None = None
    fingerprint: str | None = None
    state: str = RunState.NOT_STARTED.value  # a RunState value
    state_detail: str = ""
    running: bool = False
    pid: int | None = None
    host: str | None = None
    message: str = ""
    # progress
    step: int = 0
    total_steps: int | None = None
    progress: float | None = None  # 0..1
    elapsed_seconds: float | None = None  # training time recorded in the metrics
    seconds_per_step: float | None = None  # wall time per step in this process (see _seconds_per_step)
    eta_seconds: float | None = None  # remaining steps x seconds_per_step, while running
    # losses
    train_loss: float | None = None  # the last step
    train_loss_mean: float | None = None  # mean of the last TREND_WINDOW steps
    train_trend: str | None = None  # "down", "up", "flat"
    train_trend_delta: float | None = None
    val_loss: float | None = None  # the last validation
    val_step: int | None = None
    val_trend: str | None = None
    val_trend_delta: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    gap: float | None = None  # at the last validation: val_loss - gap_train_loss (farense.overfitting)
    gap_train_loss: float | None = None  # the gap's train loss: mean of the steps since the validation before
    gap_train_steps: int | None = None  # how many steps that mean covers
    gap_status: str | None = None  # EXCELENTE / BOM / MODERADO / CRÍTICO
    # throughput
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    peak_memory_gb: float | None = None
    # checkpoints
    checkpoints: int = 0
    last_checkpoint_step: int | None = None
    last_checkpoint_age_seconds: float | None = None
    # disk
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    disk_used_percent: float | None = None
    disk_level: str | None = None  # ok / low / high / flood
    # early stopping
    patience: int | None = None  # None: early stopping is off
    patience_left: int | None = None
    # activity
    updated_at: float | None = None
    last_activity_age_seconds: float | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if v == v and v not in (float("inf"), float("-inf")) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime
    except OSError:
        return None


def last_activity(paths: RunPaths, state_doc: Mapping[str, Any] | None = None) -> float | None:
    """Unix time of the run's last write we can see (state file, metrics, config, checkpoints)."""
    times = [_mtime(p) for p in (paths.state, paths.metrics_jsonl, paths.config, paths.checkpoints, paths.summary)]
    if state_doc and (u := _num(state_doc.get("updated_at"))) is not None:
        times.append(u)
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _trend(before: float | None, after: float | None) -> tuple[str | None, float | None]:
    if before is None or after is None:
        return None, None
    delta = after - before
    if abs(delta) < FLAT_RELATIVE * max(abs(before), 1e-12):
        return "flat", delta
    return ("down" if delta < 0 else "up"), delta


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _seconds_per_step(rows: Sequence[Mapping[str, Any]], resumed_from: int) -> float | None:
    """Wall seconds per optimizer step over this process's rows (validation and checkpoints included).

    Rows without a wall `timestamp` (older trainers) fall back to the recorded step time of the
    last TREND_WINDOW steps plus the checkpoint writes, which leaves validation out.
    """
    mine = [(r["step"], t) for r in rows if r["step"] > resumed_from and (t := _num(r.get("timestamp"))) is not None]
    if len(mine) >= 2 and mine[-1][0] > mine[0][0] and mine[-1][1] >= mine[0][1]:
        return (mine[-1][1] - mine[0][1]) / (mine[-1][0] - mine[0][0])
    if len(rows) < 2:
        return None
    first, last = rows[-min(len(rows), TREND_WINDOW + 1)], rows[-1]
    e0, e1 = _num(first.get("elapsed_seconds")), _num(last.get("elapsed_seconds"))
    steps = last["step"] - first["step"]
    if e0 is None or e1 is None or steps <= 0 or e1 < e0:
        return None
    ck = sum(c for r in rows if (c := _num(r.get("checkpoint_seconds"))) is not None)
    return (e1 - e0) / steps + ck / max(last["step"], 1)


def _run_config(paths: RunPaths) -> ExperimentConfig | None:
    try:
        return config_from_json(paths.config)
    except (OSError, ValueError, FarenseError, KeyError, TypeError):  # missing, torn or from another version
        return None


def _latest_checkpoint_state(infos: Sequence[Any]) -> dict[str, Any]:
    """state.json of the newest checkpoint still there (pruning may remove one as we read)."""
    for info in reversed(infos):
        if (doc := read_saved_progress(info)) is not None:
            return doc
    return {}


def _disk(run_dir: Path, config: ExperimentConfig | None, usage: Callable[[Path], Any] | None,
          next_write: int) -> tuple[int | None, int | None, float | None, str | None]:
    """(free, total, used %, watermark level) of the filesystem holding the run: the disk guard's reading."""
    try:
        u = (usage or disk_usage)(run_dir)
    except OSError:
        return None, None, None, None
    u = Usage(total=int(u.total), used=int(u.used), free=int(u.free))
    level = None
    if config is not None:
        level = DiskGuard(config.disk, run_dir, usage=lambda _p: u).raw_level(u, next_write).value
    return u.free, u.total, u.used_percent, level


def snapshot(
    run_dir: str | os.PathLike[str],
    *,
    now: float | None = None,
    usage: Callable[[Path], Any] | None = None,
    lock_probe: Callable[[Path], LockInfo] = probe_lock,
    alive: Callable[[int], bool] = pid_alive,
) -> MonitorSnapshot:
    """Read one run's files into a MonitorSnapshot; never raises on missing or half-written files.

    `usage(path)` returns total/used/free bytes (default: statvfs via the disk guard); `lock_probe`
    and `alive` answer who holds the run lock and whether a pid lives (tests pass fakes).
    """
    now = time.time() if now is None else now
    paths = RunPaths(Path(run_dir))
    doc = read_run_state(paths.state)
    lock = lock_probe(paths.lock)
    state, detail, running = effective_state(doc, lock, alive=alive, problem=run_state_problem(paths.state))
    doc = doc or {}
    config = _run_config(paths)
    rows = read_metrics(paths.metrics_jsonl, warn=None)  # valid rows only; a watcher does not warn every refresh
    try:
        checkpoints = CheckpointStore(paths.checkpoints).list()
    except OSError:
        checkpoints = []
    ckpt_state = _latest_checkpoint_state(checkpoints)
    warnings: list[str] = []

    progress = _progress_fields(doc, rows, ckpt_state, config, running)
    losses = _loss_fields(rows, paths)
    last = rows[-1] if rows else {}
    last_ckpt = checkpoints[-1] if checkpoints else None
    free, total_disk, used_pct, level = _disk(paths.root, config, usage,
                                              last_ckpt.size_bytes if last_ckpt is not None else 0)
    if level in ("high", "flood"):
        warnings.append(f"disk {level}: {format_size(free or 0)} free")
    activity = last_activity(paths, doc)
    age = now - activity if activity is not None else None
    if running and age is not None and age > max(STALL_SECONDS, 20 * (progress["seconds_per_step"] or 0)):
        warnings.append(f"no file of the run changed for {format_duration(age)}: is it stuck?")

    return MonitorSnapshot(
        run_dir=str(paths.root), run_name=paths.name, taken_at=now,
        config_name=config.name if config is not None else None,
        fingerprint=(config.fingerprint if config is not None else doc.get("fingerprint")),
        state=state, state_detail=detail, running=running,
        pid=lock.pid if lock.held else _int(doc.get("pid")),
        host=doc.get("host") if isinstance(doc.get("host"), str) else lock.host,
        message=str(doc.get("message") or ""),
        **progress, **losses,
        learning_rate=_num(last.get("learning_rate")),
        tokens_per_second=_num(last.get("tokens_per_second")),
        peak_memory_gb=_num(last.get("peak_memory_gb")),
        checkpoints=len(checkpoints),
        last_checkpoint_step=last_ckpt.step if last_ckpt is not None else None,
        last_checkpoint_age_seconds=now - last_ckpt.created_at if last_ckpt is not None else None,
        disk_free_bytes=free, disk_total_bytes=total_disk, disk_used_percent=used_pct, disk_level=level,
        **_patience_fields(config, rows, ckpt_state, state),
        updated_at=activity, last_activity_age_seconds=age, warnings=tuple(warnings),
    )


def _progress_fields(doc: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], ckpt_state: Mapping[str, Any],
                     config: ExperimentConfig | None, running: bool) -> dict[str, Any]:
    """Progress: the state file is rewritten after every step; metrics and checkpoints back it up."""
    step = max([_int(doc.get("step")) or 0, rows[-1]["step"] if rows else 0])
    total = (_int(doc.get("total_steps")) or _int(ckpt_state.get(TOTAL_STEPS_KEY))
             or (config.training.iters if config is not None and config.training.iters else None))
    sps = _seconds_per_step(rows, _int(doc.get("resumed_from")) or 0)
    return {
        "step": step, "total_steps": total, "progress": min(step / total, 1.0) if total else None,
        "elapsed_seconds": _num(rows[-1].get("elapsed_seconds")) if rows else None, "seconds_per_step": sps,
        "eta_seconds": max(total - step, 0) * sps if running and sps is not None and total else None,
    }


def _loss_fields(rows: Sequence[Mapping[str, Any]], paths: RunPaths) -> dict[str, Any]:
    """The losses, their trends, the best validation and the gap at the last one."""
    train = [v for r in rows if (v := _num(r.get("train_loss"))) is not None]
    w = min(TREND_WINDOW, len(train) // 2)
    train_trend, train_delta = _trend(_mean(train[-2 * w:-w]), _mean(train[-w:])) if w >= 1 else (None, None)
    vals = [r for r in rows if _num(r.get("val_loss")) is not None]
    val_last = vals[-1] if vals else {}
    val_trend, val_delta = _trend(_num(vals[-2]["val_loss"]), _num(vals[-1]["val_loss"])) if len(vals) >= 2 else (None, None)
    best = min(vals, key=lambda r: r["val_loss"]) if vals else None
    best_val, best_step = (best["val_loss"], best["step"]) if best else (None, None)
    if best is None:
        try:
            b = orjson.loads(paths.best_record.read_bytes())
            best_val, best_step = _num(b.get("val_loss")), _int(b.get("step"))
        except (OSError, orjson.JSONDecodeError, AttributeError):
            pass
    gs = val_last.get("gap_status") if val_last else None
    return {
        "train_loss": _num(rows[-1].get("train_loss")) if rows else None,
        "train_loss_mean": _mean(train[-TREND_WINDOW:]), "train_trend": train_trend, "train_trend_delta": train_delta,
        "val_loss": _num(val_last.get("val_loss")) if val_last else None,
        "val_step": _int(val_last.get("step")) if val_last else None,
        "val_trend": val_trend, "val_trend_delta": val_delta, "best_val_loss": best_val, "best_step": best_step,
        "gap": _num(val_last.get("gap")) if val_last else None,
        "gap_train_loss": _num(val_last.get("train_loss_window")) if val_last else None,
        "gap_train_steps": _int(val_last.get("train_loss_window_steps")) if val_last else None,
        "gap_status": gs if isinstance(gs, str) else None,
    }


def _patience_fields(config: ExperimentConfig | None, rows: Sequence[Mapping[str, Any]],
                     ckpt_state: Mapping[str, Any], state: str) -> dict[str, Any]:
    """Early stopping: the latest validation row says how much patience is left; else the checkpoint."""
    patience = (config.early_stopping.patience if config is not None else None) or None
    vals = [r for r in rows if _num(r.get("val_loss")) is not None]
    patience_left = _int(vals[-1].get("patience_left")) if vals else None
    if patience and patience_left is None:
        es = (ckpt_state.get(PROGRESS_KEY) or {}).get(EARLY_STOPPING_KEY) or {}
        waited = _int(es.get("evaluations_without_improvement"))
        patience_left = patience - waited if waited is not None else patience
    if state == RunState.EARLY_STOPPED.value:
        patience_left = 0
    return {"patience": patience, "patience_left": patience_left}


# --------------------------------------------------------------------------- formatting


def _f(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


_ARROWS = {"down": "↓", "up": "↑", "flat": "→"}


def _trend_text(trend: str | None, delta: float | None) -> str:
    if trend is None or delta is None:
        return ""
    return f"{_ARROWS[trend]} {delta:+.4f}"


def _patience_text(s: MonitorSnapshot) -> str:
    if s.patience is None:
        return "off"
    left = "-" if s.patience_left is None else str(s.patience_left)
    return f"{left} of {s.patience} validations left"


def plain_fields(s: MonitorSnapshot) -> list[tuple[str, str]]:
    """(key, value) pairs of the plain line, in display order; values are plain ASCII-safe text."""
    total = "?" if s.total_steps is None else str(s.total_steps)
    return [
        ("run", s.run_name),
        ("state", s.state),
        ("detail", s.state_detail),
        ("step", f"{s.step}/{total}"),
        ("progress", "-" if s.progress is None else f"{100 * s.progress:.1f}%"),
        ("eta", format_duration(s.eta_seconds) if s.eta_seconds is not None else "-"),
        ("train_loss", _f(s.train_loss)),
        ("train_mean", _f(s.train_loss_mean)),
        ("train_trend", s.train_trend or "-"),
        ("val_loss", _f(s.val_loss)),
        ("val_trend", s.val_trend or "-"),
        ("best_val_loss", _f(s.best_val_loss)),
        ("best_step", "-" if s.best_step is None else str(s.best_step)),
        ("gap", _f(s.gap, "+.4f")),
        ("gap_train_loss", _f(s.gap_train_loss)),
        ("gap_train_steps", "-" if s.gap_train_steps is None else str(s.gap_train_steps)),
        ("gap_status", s.gap_status or "-"),
        ("lr", _f(s.learning_rate, ".3e")),
        ("tokens_per_s", _f(s.tokens_per_second, ".1f")),
        ("peak_mem_gb", _f(s.peak_memory_gb, ".3f")),
        ("checkpoints", str(s.checkpoints)),
        ("last_checkpoint", "-" if s.last_checkpoint_step is None else str(s.last_checkpoint_step)),
        ("last_checkpoint_age", format_duration(s.last_checkpoint_age_seconds)
         if s.last_checkpoint_age_seconds is not None else "-"),
        ("disk_free", format_size(s.disk_free_bytes).replace(" ", "") if s.disk_free_bytes is not None else "-"),
        ("disk_used", "-" if s.disk_used_percent is None else f"{s.disk_used_percent:.1f}%"),
        ("disk_level", s.disk_level or "-"),
        ("patience_left", "off" if s.patience is None else
         f"{'-' if s.patience_left is None else s.patience_left}/{s.patience}"),
        ("last_activity", format_duration(s.last_activity_age_seconds) if s.last_activity_age_seconds is not None
         else "-"),
    ]


def plain_line(s: MonitorSnapshot) -> str:
    """One `key=value` line (values with spaces quoted as a shell would), for logs and CI."""
    return " ".join(f"{k}={shlex.quote(v) if v else repr('')}" for k, v in plain_fields(s))


def parse_plain_line(line: str) -> dict[str, str]:
    """The inverse of plain_line, for scripts and tests."""
    return dict(part.split("=", 1) for part in shlex.split(line))


_STATE_STYLE = {
    RunState.RUNNING.value: "bold green", RunState.COMPLETED.value: "bold blue",
    RunState.EARLY_STOPPED.value: "bold blue", RunState.PREEMPTED.value: "bold yellow",
    RunState.PAUSED_DISK_FULL.value: "bold yellow", RunState.CRASHED.value: "bold red",
    RunState.FAILED.value: "bold red", RunState.NOT_STARTED.value: "dim",
}
GAP_STYLE = {"EXCELENTE": "bold green", "BOM": "green", "MODERADO": "yellow", "CRÍTICO": "bold red"}
_LEVEL_STYLE = {"ok": "green", "low": "yellow", "high": "bold dark_orange", "flood": "bold red"}


def render(s: MonitorSnapshot) -> Any:
    """A rich renderable of the snapshot: a panel with a progress bar and the fields by group."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    state = Text(s.state_detail or s.state, style=_STATE_STYLE.get(s.state, ""))
    t.add_row("state", state)
    total = "?" if s.total_steps is None else str(s.total_steps)
    pct = "" if s.progress is None else f"  {100 * s.progress:.1f}%"
    eta = f"  ETA {format_duration(s.eta_seconds)}" if s.eta_seconds is not None else ""
    sps = f"  ({s.seconds_per_step:.2f} s/step)" if s.seconds_per_step is not None else ""
    t.add_row("step", f"{s.step} / {total}{pct}{eta}{sps}")
    if s.progress is not None:
        t.add_row("", ProgressBar(total=100.0, completed=100.0 * s.progress, width=50))
    train = f"{_f(s.train_loss)} (last step)"
    if s.train_trend:
        train += f"  {_trend_text(s.train_trend, s.train_trend_delta)} over the last {TREND_WINDOW} steps"
    t.add_row("train loss", train)
    val = _f(s.val_loss)
    if s.val_step is not None:
        val += f" at step {s.val_step}"
    if s.val_trend:
        val += f"  {_trend_text(s.val_trend, s.val_trend_delta)}"
    if s.best_val_loss is not None:
        val += f"  (best {s.best_val_loss:.4f} at step {s.best_step})"
    t.add_row("val loss", val)
    reading = GapReading.of(s.val_loss, s.gap_train_loss, s.gap_train_steps)
    gap = Text(f"{reading.describe()}  " if reading is not None else f"{_f(s.gap, '+.4f')}  ")
    gap.append(s.gap_status or "-", style=GAP_STYLE.get(s.gap_status or "", ""))
    t.add_row("gap", gap)
    t.add_row("learning rate", _f(s.learning_rate, ".3e"))
    t.add_row("tokens/s", _f(s.tokens_per_second, ".1f"))
    t.add_row("peak memory", "-" if s.peak_memory_gb is None else f"{s.peak_memory_gb:.3f} GB")
    ck = f"{s.checkpoints} kept"
    if s.last_checkpoint_step is not None:
        ck += f", last step {s.last_checkpoint_step} ({format_duration(s.last_checkpoint_age_seconds)} ago)"
    t.add_row("checkpoints", ck)
    disk = Text("-" if s.disk_free_bytes is None else
                f"{format_size(s.disk_free_bytes)} free of {format_size(s.disk_total_bytes or 0)} "
                f"({s.disk_used_percent:.1f}% used)  watermark ")
    if s.disk_free_bytes is not None:
        disk.append(s.disk_level or "?", style=_LEVEL_STYLE.get(s.disk_level or "", ""))
    t.add_row("disk", disk)
    t.add_row("early stopping", _patience_text(s))
    t.add_row("last activity", f"{format_duration(s.last_activity_age_seconds)} ago"
              if s.last_activity_age_seconds is not None else "-")
    if s.message and s.state != RunState.RUNNING.value:
        t.add_row("message", s.message)
    parts: list[Any] = [t]
    for w in s.warnings:
        parts.append(Text(f"warning: {w}", style="bold yellow"))
    title = f"farense monitor: {s.run_name}" + (f" ({s.config_name})" if s.config_name else "")
    return Panel(Group(*parts), title=title, subtitle=s.run_dir, expand=False)


def render_text(s: MonitorSnapshot, *, width: int = 110, color: bool = False) -> str:
    """The rich view as a string (for tests and for logs that keep layout)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=color, color_system="standard" if color else None,
            legacy_windows=False).print(render(s))
    return buf.getvalue()


# --------------------------------------------------------------------------- finding a run


def most_recent_run(runs_dir: str | os.PathLike[str]) -> Path:
    """The run under `runs_dir` that wrote last; FarenseError naming the directory if there is none."""
    runs = find_runs(runs_dir)
    if not runs:
        raise FarenseError(f"no runs under {runs_dir} (a run directory has run_state.json or config.json); "
                           "name one: farense monitor RUN_DIR or CONFIG")

    def key(p: Path) -> float:
        paths = RunPaths(p)
        return last_activity(paths, read_run_state(paths.state)) or 0.0

    return max(runs, key=key)


def resolve_run_dir(spec: str | None, *, runs_dir: str | os.PathLike[str] | None = None,
                    overlays: Sequence[str] = ()) -> Path:
    """RUN as the commands take it: a run directory, a config name (its run_dir), or None (latest)."""
    if spec is None:
        ws = Path(os.environ.get("FARENSE_WORKSPACE", "."))
        return most_recent_run(Path(runs_dir) if runs_dir else ws / "runs").resolve()
    p = Path(spec)
    if p.is_dir():
        if is_run_dir(p) or (p / "metrics.jsonl").is_file():
            return p.resolve()
        runs = find_runs(p)
        if runs:
            return most_recent_run(p).resolve()
        raise FarenseError(f"{p} is not a run directory (no run_state.json, config.json or metrics.jsonl)")
    return load_config(spec, overlays=list(overlays)).run_dir


# --------------------------------------------------------------------------- the live loop


def watch(
    run_dir: str | os.PathLike[str],
    *,
    refresh: float = 5.0,
    once: bool = False,
    as_json: bool = False,
    out: TextIO | None = None,
    tty: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
    max_refreshes: int | None = None,
    take: Callable[[Path], MonitorSnapshot] | None = None,
) -> int:
    """Show the run until interrupted: rich Live on a TTY, one plain (or JSON) line per refresh elsewhere.

    `max_refreshes`, `sleep` and `take` let tests run the loop without waiting.
    """
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    take = take or (lambda p: snapshot(p))
    path = Path(run_dir)
    count = 0

    def done() -> bool:
        return once or (max_refreshes is not None and count >= max_refreshes)

    try:
        if tty and not as_json:
            from rich.console import Console

            console = Console(file=out)
            if once:
                console.print(render(take(path)))
                return 0
            from rich.live import Live

            with Live(render(take(path)), console=console, auto_refresh=False, transient=False) as live:
                count = 1
                while not done():
                    sleep(refresh)
                    live.update(render(take(path)), refresh=True)
                    count += 1
            return 0
        while True:
            s = take(path)
            out.write((json.dumps(s.to_dict(), ensure_ascii=False) if as_json else plain_line(s)) + "\n")
            out.flush()
            count += 1
            if done():
                return 0
            sleep(refresh)
    except KeyboardInterrupt:
        return 0

