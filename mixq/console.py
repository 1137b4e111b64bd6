"""Console output shared by the command line and the demo: one summary-table style."""

from __future__ import annotations

import math
from typing import Any, Sequence

MISSING = "–"  # shown for a value that was not measured


def cell(x: Any) -> str:
    """A table cell: floats to 4 significant digits, None or NaN (not measured) as '–'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    if isinstance(x, str):
        return x
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a rich table: first column left-aligned, the rest right-aligned."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*[cell(x) for x in r])
    Console(stderr=False, highlight=False).print(t)
