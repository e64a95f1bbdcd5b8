"""How every bench orders and reports its runs: side by side in mirror order; min, median and max
of the runs, a table, a results file."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

T = TypeVar("T")


def mirrored(sides: Sequence[T], round_: int) -> Sequence[T]:
    """`sides` in their order in even rounds and reversed in odd ones, so that the machine's drift
    weighs on each side of a comparison alike."""
    return sides if round_ % 2 == 0 else sides[::-1]


def spread(values: Sequence[float]) -> dict[str, Any]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "runs": list(values)}


def spread_text(figure: dict[str, Any], digits: str = ".3g") -> str:
    """"min / median / max" of a `spread`."""
    return " / ".join(f"{figure[name]:{digits}}" for name in ("min", "median", "max"))


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def write_results(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")
    Console().print(f"written to {path}")
