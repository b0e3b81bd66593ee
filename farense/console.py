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
