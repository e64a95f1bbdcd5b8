"""A JSONL manifest read as it arrives: one item per line, parsed line by line.

Bytes are split into lines before decoding, so a character cut between two network chunks is
never misread, and a bad line is named by its number. The digest covers the raw bytes, so an
idempotent replay is recognised without keeping the body.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from core.errors import FieldError
from core.limits import loads

# Far above any valid item (its text fields are bounded at 2,000 characters each); past it a line is
# refused without being kept, so one endless line costs neither memory nor parsing.
MAX_LINE_BYTES = 256 * 1024
_BOM = b"\xef\xbb\xbf"  # Windows editors and PowerShell start UTF-8 files with it


class ManifestReader:
    """Feed bytes as they come; `take` the parsed items and the errors of bad lines so far."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._tail = bytearray()  # the line under way; appended to, never rebuilt per chunk
        self._overlong = False
        self._line = 0
        self._items: list[Any] = []
        self._errors: list[FieldError] = []
        self._hash = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self._hash.update(data)
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            self._extend(data[start:end])
            self._close_line()
            start = end + 1
        self._extend(data[start:])

    def end(self) -> None:
        if self._tail or self._overlong:
            self._close_line()

    def _extend(self, part: bytes) -> None:
        if self._overlong or len(self._tail) + len(part) > MAX_LINE_BYTES:
            self._overlong, self._tail = True, bytearray()
        else:
            self._tail += part

    def _close_line(self) -> None:
        if self._overlong:
            self._line += 1
            self._errors.append(FieldError("item", f"longer than {MAX_LINE_BYTES:,} bytes", f"line {self._line}"))
        else:
            self._parse(bytes(self._tail))
        self._tail, self._overlong = bytearray(), False

    @property
    def pending(self) -> int:
        return len(self._items) + len(self._errors)

    def take(self) -> tuple[list[Any], list[FieldError]]:
        items, errors = self._items, self._errors
        self._items, self._errors = [], []
        return items, errors

    def digest(self, options: dict[str, Any]) -> str:
        """The body's digest, and the request's other options' (metadata, webhook, windows)."""
        meta = json.dumps(options, sort_keys=True, default=str).encode()
        return hashlib.sha256(self._hash.digest() + meta).hexdigest()

    def _parse(self, raw: bytes) -> None:
        self._line += 1
        where = f"line {self._line}"
        if self._line == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._errors.append(FieldError("body", f"not UTF-8 (byte {exc.start} of the line)", where))
            return
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            return
        try:
            item = loads(line, self.max_depth)
        except json.JSONDecodeError as exc:
            self._errors.append(FieldError("item", f"not valid JSON: {exc.msg}", where))
            return
        if not isinstance(item, dict):
            self._errors.append(FieldError("item", "must be a JSON object", where))
        elif "custom_id" in item and not isinstance(item["custom_id"], str):
            self._errors.append(FieldError("custom_id", "must be a string", where))
        elif not item.get("custom_id"):
            self._errors.append(FieldError("custom_id", "every batch item needs a custom_id", where))
        else:
            self._items.append(item)
