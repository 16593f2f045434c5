"""Reading FHIR input files: JSON resources and Bundles, ndjson (streamed line by line), folders."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".json", ".ndjson")


@dataclass(frozen=True)
class Item:
    """One parsed JSON document (or the reason it could not be parsed) and where it came from."""

    origin: str  # file name, with :line for ndjson
    data: Any = None
    error: str | None = None


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files named, plus every *.json / *.ndjson below named folders, in a stable order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()))
        else:
            found.append(path)
    return found


def _cds_hooks_payload(data: Any) -> list[Any] | None:
    """The FHIR resources inside a CDS Hooks request (prefetch values, context.draftOrders), if it is one."""
    if not isinstance(data, dict) or "resourceType" in data or not ("prefetch" in data or "context" in data):
        return None
    found = [v for v in (data.get("prefetch") or {}).values() if isinstance(v, dict)]
    context = data.get("context")
    if isinstance(context, dict) and isinstance(context.get("draftOrders"), dict):
        found.append(context["draftOrders"])
    return found


def read_items(path: Path) -> Iterator[Item]:
    """Parsed documents of one file; ndjson is read line by line, never whole."""
    name = path.name
    try:
        if path.suffix == ".ndjson":
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        yield _parse(line, f"{name}:{number}")
            return
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        yield Item(name, error=f"cannot read: {exc}")
        return
    item = _parse(text, name)
    if item.error is None:
        embedded = _cds_hooks_payload(item.data)
        if embedded is not None:
            for data in embedded:
                yield Item(f"{name} (CDS Hooks payload)", data)
            return
        if isinstance(item.data, list):
            for index, data in enumerate(item.data):
                yield Item(f"{name}[{index}]", data)
            return
    yield item


def _parse(text: str, origin: str) -> Item:
    try:
        return Item(origin, json.loads(text))
    except json.JSONDecodeError as exc:
        return Item(origin, error=f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")


def read_all(paths: Iterable[Path]) -> Iterator[Item]:
    """Every document of every file under ``paths``."""
    for path in expand_paths(paths):
        yield from read_items(path)
