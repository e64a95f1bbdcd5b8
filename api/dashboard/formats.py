"""Template filters: ages, sizes, rates and times in the few words a table cell has room for."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m {seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h {seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d {seconds % 86400 // 3600:.0f}h"


def since(moment: datetime | None, now: datetime) -> str:
    return age((now - moment).total_seconds()) if moment else "-"


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def rate(value: float | None) -> str:
    return "-" if not value else (f"{value:.2f}/s" if value < 10 else f"{value:.0f}/s")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") + " UTC" if moment else "-"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


FILTERS = {"age": age, "since": since, "size": size, "rate": rate, "percent": percent, "when": when,
           "pretty": pretty}
