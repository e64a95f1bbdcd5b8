"""How every bench reports a figure measured several times: min, median and max of the runs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def spread(values: Sequence[float]) -> dict[str, Any]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "runs": list(values)}


def spread_text(figure: dict[str, Any], digits: str = ".3g") -> str:
    """"min / median / max" of a `spread`."""
    return " / ".join(f"{figure[name]:{digits}}" for name in ("min", "median", "max"))
