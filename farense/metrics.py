"""Training metrics: one orjson line per optimizer step, plus the seed's JSON/CSV/summary files.

metrics.jsonl is the source of truth; on resume it is cut back to the checkpoint's step so that a
resumed run's history equals an uninterrupted one's.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterable

import orjson

CSV_COLUMNS = (
    "step", "epoch", "train_loss", "val_loss", "gap", "gap_status", "learning_rate",
    "tokens", "tokens_per_second", "peak_memory_gb", "elapsed_seconds",
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics file (a line torn by a crash is ignored)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return _parse_rows(data)


def _parse_rows(data: bytes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for line in data.splitlines():
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
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
        return _parse_rows(data[:end])


class MetricsLog:
    """Appends step rows; rank 0 only. Lines are flushed (not fsynced: metrics are rebuilt on resume)."""

    def __init__(self, path: Path, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._fh: io.BufferedWriter | None = None

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Drop rows after `step` (work a crash threw away); returns the kept rows."""
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        if self.enabled:
            from .fsutil import atomic_write_bytes

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
    from .fsutil import atomic_write_bytes

    rows = list(rows)
    atomic_write_bytes(json_path, orjson.dumps({"history": rows}, option=orjson.OPT_INDENT_2))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
    atomic_write_bytes(csv_path, buf.getvalue().encode())
