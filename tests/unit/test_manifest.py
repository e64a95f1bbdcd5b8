"""The streamed manifest reader on its own: lines cut anywhere by the network, a byte-order mark,
CRLF, and a line too long to keep."""

from __future__ import annotations

from core.manifest import MAX_LINE_BYTES, ManifestReader

GOOD = b'{"custom_id": "%s", "kind": "generate", "prompt": "x"}'


def read(body: bytes, chunk: int) -> tuple[list[str], list[str]]:
    reader = ManifestReader(max_depth=32)
    for start in range(0, len(body), chunk):
        reader.feed(body[start:start + chunk])
    reader.end()
    items, errors = reader.take()
    return [item["custom_id"] for item in items], [str(error) for error in errors]


def test_lines_cut_anywhere_a_byte_order_mark_and_crlf_read_the_same() -> None:
    body = b"\xef\xbb\xbf" + GOOD % b"a" + b"\r\n# a comment\r\n\r\n" + GOOD % "é".encode() + b"\r\n" + GOOD % b"c"
    for chunk in (1, 2, 7, len(body)):  # 1 and 2 cut the mark and the two-byte "é" in half
        assert read(body, chunk) == (["a", "é", "c"], [])


def test_a_line_too_long_is_refused_by_number_without_being_kept() -> None:
    endless = b'{"custom_id": "big", "prompt": "' + b"x" * (3 * MAX_LINE_BYTES) + b'"}'
    body = GOOD % b"a" + b"\n" + endless + b"\n" + GOOD % b"b" + b"\n" + endless
    items, errors = read(body, 65536)
    assert items == ["a", "b"]
    assert errors == [f"item 'line {n}': item: longer than {MAX_LINE_BYTES:,} bytes" for n in (2, 4)]
    reader = ManifestReader(max_depth=32)
    reader.feed(endless)
    assert len(reader._tail) <= MAX_LINE_BYTES  # what is held of the line under way stays bounded
