"""Limits on hostile input, checked before anything is parsed or stored: body size, JSON nesting depth,
number length, entries per Bundle, ndjson line length. Each refusal names the limit and its setting.

The byte checks run in C-speed passes (regex and ``bytes.translate``), so a 10 MB body costs tens of
milliseconds; call them on a lane thread (``service.offload``), never on the event loop.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate, repeat
from typing import Any

import orjson
from fastapi import Request

from config.settings import Settings, get_settings
from service.errors import FhirError

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
# '[' and '{' -> 2, ']' and '}' -> 0: minus one gives the depth step
_STEP = bytes.maketrans(_BRACKETS, b"\x02\x00\x02\x00")


@dataclass(frozen=True)
class Limits:
    """The limits in force (from the settings)."""

    body_bytes: int
    json_depth: int
    number_chars: int
    bundle_entries: int
    ndjson_line_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Limits:
        """The configured limits."""
        s = settings or get_settings()
        return cls(
            s.max_body_bytes, s.max_json_depth, s.max_number_chars, s.max_bundle_entries, s.max_ndjson_line_bytes
        )


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as the declared or received size exceeds ``limit`` (a chunked
    upload is counted as it arrives; nothing has been parsed or stored when it is refused)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"request body of {declared} bytes", limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large("request body", limit)
    return bytes(body)


def _too_large(what: str, limit: int) -> FhirError:
    return FhirError(413, f"{what} exceeds the limit of {limit} bytes (EHR_ALERTS_MAX_BODY_BYTES)", code="too-costly")


def json_problem(data: bytes, limits: Limits) -> str | None:
    """Why ``data`` may not be parsed (nesting deeper or a number longer than allowed), or None."""
    bare = _outside_strings(data)
    steps = bare.translate(_STEP, _NOT_BRACKETS)
    if steps:
        deepest = max(accumulate(map(operator.sub, steps, repeat(1))))
        if deepest > limits.json_depth:
            return f"JSON nested deeper than {limits.json_depth} levels (EHR_ALERTS_MAX_JSON_DEPTH)"
    if re.search(rb"[0-9.eE+\-]{%d,}" % (limits.number_chars + 1), bare):
        return f"a JSON number longer than {limits.number_chars} characters (EHR_ALERTS_MAX_NUMBER_CHARS)"
    return None


def _outside_strings(data: bytes) -> bytes:
    """``data`` without its JSON strings: structure, numbers and literals. Match by match (not one ``re.sub``
    call), so a 10 MB body never holds the GIL for long and the event loop keeps answering."""
    parts: list[bytes] = []
    last = 0
    for match in _STRING.finditer(data):
        parts.append(data[last : match.start()])
        last = match.end()
    parts.append(data[last:])
    return b" ".join(parts)


def parse_json(data: bytes, limits: Limits, where: str | None = None) -> Any:
    """Check the limits, then parse; FhirError 400 naming the limit or the JSON error."""
    problem = json_problem(data, limits)
    if problem:
        raise FhirError(400, f"refused: {problem}", where, code="too-costly")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FhirError(400, f"malformed JSON: {exc}", where, code="structure") from None


#: Bodies above this size are parsed entry by entry (see :func:`parse_bundle`).
PIECEWISE_BYTES = 1024 * 1024
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_ENTRY_KEY = b'"entry"'
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def _entry_spans(data: bytes) -> tuple[int, int, list[tuple[int, int]]] | None:
    """Where the top-level ``entry`` array is and where each of its objects starts and ends, or None when the
    body is not shaped so (then it is parsed whole). Token by token, so the interpreter switches threads."""
    depth, after_entry_key = 0, False
    array: list[int] = []
    spans: list[tuple[int, int]] = []
    start = -1
    for match in _TOKEN.finditer(data):
        at = match.start()
        char = data[at]
        if char == 34:  # a string: only the key right before the array matters
            after_entry_key = depth == 1 and data[at : match.end()] == _ENTRY_KEY
            continue
        if char in _OPEN:
            depth += 1
            if depth == 2 and char == 91 and after_entry_key and not array:
                array.append(at)
            elif depth == 3 and len(array) == 1:
                start = at
        else:
            if depth == 3 and len(array) == 1 and start >= 0:
                spans.append((start, match.end()))
                start = -1
            elif depth == 2 and char == 93 and len(array) == 1:
                array.append(match.end())
            depth -= 1
        after_entry_key = False
    if len(array) != 2:
        return None
    rest = bytearray(data[array[0] + 1 : array[1] - 1])
    for begin, end in reversed(spans):  # only commas and blanks may be left between the objects
        del rest[begin - array[0] - 1 : end - array[0] - 1]
    return (array[0], array[1], spans) if not bytes(rest).strip(b", \t\r\n") else None


def parse_bundle(data: bytes, limits: Limits) -> Any:
    """:func:`parse_json` for a Bundle body; a large one is parsed entry by entry (one ``orjson.loads`` of 10 MB
    holds the interpreter for about 150 ms, during which no other request is answered)."""
    spans = _entry_spans(data) if len(data) > PIECEWISE_BYTES else None
    if spans is None:
        return parse_json(data, limits)
    problem = json_problem(data, limits)
    if problem:
        raise FhirError(400, f"refused: {problem}", code="too-costly")
    begin, end, entries = spans
    try:
        bundle = orjson.loads(data[:begin] + b"[]" + data[end:])
        if isinstance(bundle, dict):
            bundle["entry"] = [orjson.loads(data[s:e]) for s, e in entries]
    except orjson.JSONDecodeError as exc:
        raise FhirError(400, f"malformed JSON: {exc}", code="structure") from None
    return bundle


def count_entries(bundle: Mapping[str, Any], limit: int) -> int:
    """Entries of a Bundle, nested Bundles included; stops counting past ``limit``."""
    total = 0
    stack: list[Any] = [bundle]
    while stack and total <= limit:
        entries = stack.pop().get("entry")
        if not isinstance(entries, list):
            continue
        total += len(entries)
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, Mapping) else None
            if isinstance(resource, Mapping) and resource.get("resourceType") == "Bundle":
                stack.append(resource)
    return total


def check_entries(bundle: Mapping[str, Any], limits: Limits) -> None:
    """413 when the Bundle holds more entries than allowed (nothing is stored)."""
    if count_entries(bundle, limits.bundle_entries) > limits.bundle_entries:
        raise FhirError(
            413,
            f"Bundle holds more than {limits.bundle_entries} entries (EHR_ALERTS_MAX_BUNDLE_ENTRIES); split it or "
            "use POST /fhir/$import",
            "Bundle.entry",
            code="too-costly",
        )


def ndjson_lines(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every non-blank line."""
    for number, line in enumerate(body.split(b"\n"), start=1):
        if line.strip():
            yield number, line


def line_problem(line: bytes, limits: Limits) -> str | None:
    """Why one ndjson line is refused before parsing (too long, too deep, a number too long), or None."""
    if len(line) > limits.ndjson_line_bytes:
        return f"line longer than {limits.ndjson_line_bytes} bytes (EHR_ALERTS_MAX_NDJSON_LINE_BYTES)"
    return json_problem(line, limits)
