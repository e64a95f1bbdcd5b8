"""A batch's terms: how long its jobs may wait (`completion_window`) and how long its outputs are
kept (`output_ttl`), given as seconds or as a duration string like "24h", "90m", "7d"."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from core.errors import InvalidInput
from core.settings import Settings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*([0-9]{1,12})\s*([smhd]?)\s*$")  # [0-9]: \d would also take "²", which int() refuses

# (lowest, highest) seconds each term accepts.
LIMITS = {"completion_window": (60, 30 * 86400), "output_ttl": (3600, 30 * 86400)}


def human(seconds: int) -> str:
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def parse_duration(value: Any, field: str) -> int:
    """Seconds from an int or a string with a unit (s, m, h, d), within the field's limits."""
    if isinstance(value, bool):
        raise InvalidInput("must be seconds or a duration like \"24h\", not a boolean", field)
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise InvalidInput(f"{value!r} is not a duration: give seconds or a number with s, m, h or d "
                           "(\"24h\", \"7d\")", field)
    low, high = LIMITS[field]
    if not low <= seconds <= high:
        raise InvalidInput(f"{human(seconds)} is out of range: from {human(low)} to {human(high)}", field)
    return seconds


@dataclass(frozen=True)
class BatchTerms:
    completion_window: int
    output_ttl: int

    @classmethod
    def parse(cls, settings: Settings, completion_window: Any = None, output_ttl: Any = None) -> BatchTerms:
        """The terms a request asked for, the settings' defaults for what it left out."""
        return cls(
            completion_window=settings.completion_window if completion_window is None
            else parse_duration(completion_window, "completion_window"),
            output_ttl=settings.output_ttl if output_ttl is None else parse_duration(output_ttl, "output_ttl"),
        )

    def columns(self, created_at: datetime) -> dict[str, Any]:
        """The batch row's values for these terms."""
        return {"completion_window": self.completion_window, "output_ttl": self.output_ttl,
                "expires_at": created_at + timedelta(seconds=self.completion_window)}
