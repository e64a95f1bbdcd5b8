"""Untrusted JSON: parsed strictly and bounded before anything recursive touches it.

Strict means RFC 8259 as PostgreSQL's json type reads it: no NaN or Infinity (Python's parser
accepts them, the database refuses them with a 500), no number too large for a float. Nesting is
measured without recursion after parsing, and a document nested deeper than the recursion limit
is caught while parsing, so neither a parser nor a serializer later hits a RecursionError.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from core.errors import FieldError
from core.settings import Settings


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON: send a finite number or null")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large: send a finite number")
    return value


# Built once: json.loads with hooks builds a new decoder for every document (a catalog line each).
_STRICT = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value (a scalar is 0, `[]` is 1), counted up to `limit` + 1."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads(data: str | bytes, max_depth: int) -> Any:
    """Parse strict JSON, or raise json.JSONDecodeError whose `msg` says what is wrong and where
    (FastAPI turns that error into a 422 for request bodies)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise json.JSONDecodeError(f"not UTF-8 (byte {exc.start})", "", exc.start) from None
    try:
        value = _STRICT.decode(data)
    except json.JSONDecodeError as exc:
        raise json.JSONDecodeError(f"{exc.msg} at line {exc.lineno}, column {exc.colno}", exc.doc,
                                   exc.pos) from None
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {max_depth} levels", data, 0) from None
    except ValueError as exc:  # our rejections above, and integers over Python's digit limit
        message = str(exc)
        if "int_max_str_digits" in message:  # Python's own words name a Python setting
            message = f"an integer of more than {sys.get_int_max_str_digits()} digits"
        raise json.JSONDecodeError(message, data, 0) from None
    # Nesting never exceeds the count of opening brackets (those inside strings only add to it):
    # a typical catalog line has two or three, and skips the walk.
    if data.count("{") + data.count("[") > max_depth and depth(value, max_depth) > max_depth:
        raise json.JSONDecodeError(f"nested deeper than {max_depth} levels", data, 0)
    return value


def check_metadata(value: Any, settings: Settings, field: str = "metadata", item: str | None = None
                   ) -> list[FieldError]:
    """Free-form metadata: a JSON object within the size and depth limits, finite numbers only
    (it may come from Python callers, not only from parsed JSON)."""
    if not isinstance(value, dict):
        return [FieldError(field, "must be a JSON object", item)]
    if depth(value, settings.max_json_depth) > settings.max_json_depth:
        return [FieldError(field, f"nested deeper than {settings.max_json_depth} levels", item)]
    try:
        size = len(json.dumps(value, allow_nan=False, ensure_ascii=False).encode())
    except UnicodeEncodeError:  # a ValueError too: first
        return [FieldError(field, "text that is not valid Unicode (a lone surrogate such as \\ud800)", item)]
    except ValueError:
        return [FieldError(field, "NaN and Infinity are not valid JSON: send finite numbers or null", item)]
    except TypeError as exc:
        return [FieldError(field, f"not JSON: {exc}", item)]
    if size > settings.max_metadata_bytes:
        return [FieldError(field, f"{size} bytes of JSON: at most {settings.max_metadata_bytes}", item)]
    return []
