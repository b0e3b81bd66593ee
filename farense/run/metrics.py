"""Training metrics: one orjson line per optimizer step, plus the seed's JSON/CSV/summary files.

metrics.jsonl is the source of truth; on resume it is cut back to the checkpoint's step so that a
resumed run's history equals an uninterrupted one's.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson

from farense.run.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "step", "epoch", "train_loss", "val_loss", "gap", "gap_status", "learning_rate",
    "tokens", "tokens_per_second", "peak_memory_gb", "elapsed_seconds",
)


# Fields a row may carry and what each must be when present (null is always allowed).
_NUMBER_FIELDS = ("epoch", "train_loss", "val_loss", "gap", "learning_rate", "tokens", "tokens_per_second",
                  "peak_memory_gb", "elapsed_seconds")

Warn = Callable[[str], None]


def row_problem(row: Any) -> str | None:
    """Why a parsed line is not a metrics row (an object with an integer step, numeric values); None if it is."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step: expected an integer >= 0, got {step!r}"
    for key in _NUMBER_FIELDS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key}: expected a number, got {value!r}"
    if not isinstance(row.get("gap_status", ""), (str, type(None))):
        return f"gap_status: expected a string, got {row['gap_status']!r}"
    return None


def _warn(message: str) -> None:
    log.warning(message)


def read_metrics(path: Path, *, warn: Warn | None = _warn) -> list[dict[str, Any]]:
    """Every valid line of a metrics file; a torn or malformed line is skipped, `warn` told its file:line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return _parse_rows(data, str(path), warn)


def _parse_rows(data: bytes, source: str, warn: Warn | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            problem: str | None = "not valid JSON (a torn or hand-edited line)"
        else:
            problem = row_problem(row)
        if problem is None:
            rows.append(row)
        elif warn is not None and line.strip():
            warn(f"warning: {source}:{number}: skipped: {problem}")
    return rows


class MetricsTail:
    """Reads the rows appended to a metrics file since the last call (a watcher's view of a live run).

    A file rewritten by a resume (new inode, or shorter) is read again from its start; a line still
    being written waits for the next call.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._inode: int | None = None
        self._offset = 0

    def new_rows(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._inode, self._offset = st.st_ino, 0
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        return _parse_rows(data[:end], str(self.path), None)


class MetricsLog:
    """Appends step rows; rank 0 only. Lines are flushed (not fsynced: metrics are rebuilt on resume)."""

    def __init__(self, path: Path, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._fh: io.BufferedWriter | None = None

    def truncate_after(self, step: int, *, warn: Warn | None = _warn) -> list[dict[str, Any]]:
        """Drop rows after `step` (work a crash threw away) and lines that are not rows; returns the kept rows."""
        rows = [r for r in read_metrics(self.path, warn=warn) if r["step"] <= step]
        if self.enabled:
            atomic_write_bytes(self.path, b"".join(orjson.dumps(r) + b"\n" for r in rows), durable=False)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab")
        self._fh.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_seed_files(rows: Iterable[dict[str, Any]], json_path: Path, csv_path: Path) -> None:
    """training_metrics.json and training_metrics.csv, as the seed named them."""
    rows = list(rows)
    atomic_write_bytes(json_path, orjson.dumps({"history": rows}, option=orjson.OPT_INDENT_2))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
    atomic_write_bytes(csv_path, buf.getvalue().encode())
