"""Reading the ``prefetch`` of a CDS Hooks call, key by key, tri-state and worse.

A key may be absent (the client did not or could not prefetch it), ``null`` (the client has no data), a
searchset Bundle (possibly paginated with ``link`` next, possibly holding an OperationOutcome entry), a single
resource, or an OperationOutcome (the client's prefetch failed). Each key ends up *complete* (use it as is),
*continued* (follow its next link on the FHIR server) or *missing* (search the FHIR server ourselves).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from service.cds.services import PrefetchQuery

State = Literal["complete", "continued", "missing"]
_FAILED = frozenset({"error", "fatal"})


@dataclass
class KeyData:
    """What the request gave for one prefetch key."""

    key: str
    state: State
    resources: list[dict[str, Any]] = field(default_factory=list)
    next_url: str | None = None
    reason: str = ""


def _outcome_failed(resource: Mapping[str, Any]) -> bool:
    issues = resource.get("issue")
    if not isinstance(issues, list):
        return True
    return any(isinstance(i, Mapping) and i.get("severity") in _FAILED for i in issues)


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, Mapping) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None


def collect_bundle(bundle: Mapping[str, Any], out: list[dict[str, Any]]) -> str | None:
    """Append the resources of a Bundle page to ``out``; return an error reason if it holds a failed
    OperationOutcome (warnings and information are ignored)."""
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        return "Bundle.entry is not an array"
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if not isinstance(resource, Mapping):
            continue
        kind = resource.get("resourceType")
        if kind == "OperationOutcome":
            if _outcome_failed(resource):
                return "the Bundle holds an OperationOutcome with an error"
            continue
        if kind == "Bundle":
            reason = collect_bundle(resource, out)
            if reason:
                return reason
            continue
        out.append(resource)  # type: ignore[arg-type]
    return None


def read_key(key: str, present: bool, value: Any) -> KeyData:
    """Classify one prefetch value."""
    if not present:
        return KeyData(key, "missing", reason="not prefetched")
    if value is None:
        return KeyData(key, "complete")  # the client has no data for it
    if not isinstance(value, Mapping) or not isinstance(value.get("resourceType"), str):
        return KeyData(key, "missing", reason="not a FHIR resource")
    kind = value["resourceType"]
    if kind == "OperationOutcome":
        return KeyData(key, "missing", reason="the client reported an error (OperationOutcome)")
    if kind != "Bundle":
        return KeyData(key, "complete", [value])  # type: ignore[list-item]
    resources: list[dict[str, Any]] = []
    reason = collect_bundle(value, resources)
    if reason:
        return KeyData(key, "missing", reason=reason)
    next_url = _next_link(value)
    if next_url:
        return KeyData(key, "continued", resources, next_url, "the Bundle has more pages")
    return KeyData(key, "complete", resources)


def read_prefetch(queries: tuple[PrefetchQuery, ...], prefetch: Mapping[str, Any]) -> dict[str, KeyData]:
    """Every key the service needs, classified; keys the service did not ask for are ignored."""
    return {q.key: read_key(q.key, q.key in prefetch, prefetch.get(q.key)) for q in queries}
