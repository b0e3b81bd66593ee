"""Terminal output: rich tables on a TTY, plain tab-separated lines elsewhere (CI, logs, Prefect)."""

from __future__ import annotations

import sys
from typing import Sequence


def is_tty() -> bool:
    return sys.stdout.isatty()


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """One table: rich when a person is watching, parseable text otherwise."""
    if is_tty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in headers:
            t.add_column(str(h))
        for r in rows:
            t.add_row(*[str(c) for c in r])
        Console().print(t)
        return
    print(f"# {title}")
    print("\t".join(str(h) for h in headers))
    for r in rows:
        print("\t".join(str(c) for c in r))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (for Prefect artifacts and reports)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def human_seconds(seconds: float | None) -> str:
    """'45.9 s', '12 min 05 s', '3 h 07 min': a duration as a person reads it in a table."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def human_value(value: object, digits: int = 4) -> str:
    """A table cell: '-' for nothing, yes/no, thousands separators, floats to `digits` places."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_duration(seconds: float | None) -> str:
    """'45s', '12m05s', '3h07m', '2d04h': short enough for a table cell."""
    if seconds is None:
        return "-"
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
