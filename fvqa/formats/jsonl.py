"""The one JSONL reader: one JSON object per line, streamed, every bad line reported with its number.

Every place in fvqa that reads JSONL records (the InfoSeek files, benchmark files, crawl manifests,
concept categories, contamination files, the local search index's corpus and manifest, Batch API
output) goes through :func:`read_jsonl` (a file) or :func:`parse_jsonl` (lines already in memory),
so they agree on what a bad line is. The policy:

* a record is a line holding one JSON **object**; blank (white-space only) lines are skipped;
* a line that is not valid UTF-8, not JSON, nested too deeply to parse (``RecursionError``), or a
  JSON value other than an object is yielded as a :class:`BadLine` (line number and reason). The
  reader never raises for a bad line and never drops one silently: the caller turns it into a
  ``rejects`` row or a one-line error (``f"{path}:{bad}"``);
* lines are split on ``\\n`` only (``str.splitlines`` would also split inside a JSON string holding
  a raw U+2028 or form feed); a UTF-8 byte-order mark on the first line is ignored; line numbers
  start at 1 and count blank lines, so they match an editor's.

It imports nothing from fvqa, so any layer can use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

Record = tuple[int, dict[str, Any]]
"""A good line: (line number, the object)."""


@dataclass(frozen=True)
class BadLine:
    """A line that is not one JSON object: its number and why, in words a person can act on, and
    the reject code callers store (`malformed_json`, or `wrong_type` for JSON that is not an object)."""

    line_no: int
    reason: str
    code: str = "malformed_json"

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


def parse_line(raw: bytes | str, line_no: int = 1) -> dict[str, Any] | BadLine | None:
    """One line -> its object, a BadLine, or None for a blank line."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            return BadLine(line_no, f"not valid UTF-8 (byte {exc.start})")
    elif line_no == 1:
        raw = raw.removeprefix("\ufeff")
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return BadLine(line_no, f"{exc.msg} at column {exc.colno}")
    except RecursionError:
        return BadLine(line_no, "JSON nested too deeply to read")
    if not isinstance(obj, dict):
        return BadLine(line_no, f"line is not a JSON object (got a JSON {_json_kind(obj)})", "wrong_type")
    return obj


def parse_jsonl(lines: Iterable[bytes | str] | str | bytes) -> Iterator[Record | BadLine]:
    """Records and bad lines of JSONL already in memory (a whole text, or an iterable of lines)."""
    if isinstance(lines, str | bytes):
        lines = lines.split("\n" if isinstance(lines, str) else b"\n")  # type: ignore[arg-type]
    for line_no, raw in enumerate(lines, start=1):
        parsed = parse_line(raw, line_no)
        if parsed is None:
            continue
        yield parsed if isinstance(parsed, BadLine) else (line_no, parsed)


def read_jsonl(path: Path) -> Iterator[Record | BadLine]:
    """Stream a JSONL file: ``(line number, object)`` per record, :class:`BadLine` per bad line.

    Raises only what opening the file raises (``OSError``); callers check the path first.
    """
    with Path(path).open("rb") as fh:
        yield from parse_jsonl(fh)


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"


# -- a fast path for million-line files: the same verdicts, found sooner ------------------------------

_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19
_MAX_BRACKETS = 512


def parse_line_fast(raw: bytes, line_no: int) -> dict[str, Any] | BadLine | None:
    """`fvqa.formats.jsonl.parse_line` (the one bad-line policy), with orjson for the common case.

    orjson (several times faster than `json`) is trusted only where it gives exactly what
    `json.loads` gives: a JSON object, no run of 19 or more digits (orjson turns integers beyond 64
    bits into floats) and at most 512 brackets (so no nesting `json` would refuse as too deep).
    Every other line, and every line orjson refuses (bad UTF-8, NaN, a BOM, a lone surrogate...),
    goes to `parse_line` for its verdict and message."""
    if ((len(raw) <= _MAX_BRACKETS or raw.count(b"[") + raw.count(b"{") <= _MAX_BRACKETS)
            and _LONG_NUMBER not in raw.translate(_DIGITS_AS_ZERO)):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is dict:
            return obj
    return parse_line(raw, line_no)
