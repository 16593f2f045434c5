"""Lenient reading: use a resource that fails strict FHIR R4 validation only in members the rules never read.

Real EHR clients send slips a strict R4 parser refuses (the CDS Hooks sandbox sends a draft
``MedicationRequest.category`` as one object instead of a list). :func:`rules.normalize.normalize_resource`
rejects the whole resource for it, so a draft furosemide order would go unnamed and a draft magnesium order
would not quiet the "no Mg measured" card. This module wraps the normaliser without changing it:

1. normalise strictly;
2. when the resource is rejected and *every* error lies in a top-level member the rules do not read
   (:data:`READ_MEMBERS` lists, per resource type, the members they do read), drop those members (and their
   ``_member`` primitive extensions) and normalise again;
3. the result says which members were dropped and why, so the caller can log and count it.

Never tolerated: an error in a member the rules read (status, code, value, times, subject, ...), an error
with no member (the resource as a whole), a modifier element (``modifierExtension``, ``implicitRules``: they
can change the meaning of everything else), and resource types without a read list. Those stay rejected.

Pure: no I/O. :func:`describe` words an issue without the values it was about (for logs and metrics).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rules.normalize import Issue, NormalizeOptions, NormalizeResult, normalize_resource

_ALWAYS_READ = ("resourceType", "id", "meta", "subject", "status")
#: Top-level members of each resource type that ``rules.normalize`` reads (``x[x]``: every choice type of
#: ``x``). An invalid member outside these lists is dropped, not fatal. Keep in step with ``rules/normalize.py``
#: (``tests/cds/test_cds_tolerance.py`` checks on real data that dropping every other member changes no fact).
READ_MEMBERS: dict[str, frozenset[str]] = {
    "Observation": frozenset(
        [
            *_ALWAYS_READ,
            "code",
            "effective[x]",
            "issued",
            "value[x]",
            "dataAbsentReason",
            "component",
            "referenceRange",
            "encounter",
        ]
    ),
    "MedicationStatement": frozenset([*_ALWAYS_READ, "medication[x]", "contained", "effective[x]"]),
    "MedicationRequest": frozenset(
        [
            *_ALWAYS_READ,
            "intent",
            "doNotPerform",
            "medication[x]",
            "contained",
            "authoredOn",
            "dispenseRequest",
            "encounter",
        ]
    ),
    "MedicationAdministration": frozenset([*_ALWAYS_READ, "medication[x]", "contained", "effective[x]"]),
    "Condition": frozenset(
        [
            *_ALWAYS_READ,
            "code",
            "category",
            "clinicalStatus",
            "verificationStatus",
            "onset[x]",
            "abatement[x]",
            "recordedDate",
            "encounter",
        ]
    ),
    "ServiceRequest": frozenset([*_ALWAYS_READ, "intent", "doNotPerform", "code", "authoredOn", "encounter"]),
    "Procedure": frozenset([*_ALWAYS_READ, "code", "performed[x]", "encounter"]),
    "Patient": frozenset([*_ALWAYS_READ, "birthDate", "gender", "name", "identifier", "deceased[x]"]),
    "Encounter": frozenset([*_ALWAYS_READ, "class", "period", "location", "type"]),
}
#: Modifier elements: a reader that does not understand them must not use the resource, so they are never
#: dropped (an invalid one keeps the resource rejected).
NEVER_DROPPED = frozenset({"modifierExtension", "implicitRules"})
_MEMBER = re.compile(r"^_?[A-Za-z][A-Za-z0-9_]{0,63}$")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`|\{[^}]*\}|\[[^\]]*\]")
_AT_PATH = re.compile(r"\s*\(at [^)]*\)\s*$")
_SAFE_SEGMENT = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]{0,63}|\d{1,6})$")


@dataclass(frozen=True)
class Lenient:
    """A normalisation result and the members left out to get it (empty: read strictly)."""

    result: NormalizeResult
    dropped: tuple[str, ...] = ()
    tolerated: tuple[Issue, ...] = ()  # the strict errors, each in a dropped member


def is_read(resource_type: str, member: str) -> bool:
    """Whether the rules read top-level ``member`` (or its ``_member`` extension) of ``resource_type``."""
    name = member.removeprefix("_")
    for read in READ_MEMBERS.get(resource_type, ()):
        if read.endswith("[x]"):
            base = read[:-3]
            if name.startswith(base) and name[len(base) : len(base) + 1].isupper():
                return True
        elif name == read:
            return True
    return False


def member_of(issue: Issue) -> str | None:
    """The top-level member an issue's path points into (``MedicationRequest.category.0`` -> ``category``)."""
    parts = issue.path.split(".")
    if len(parts) < 2 or not _MEMBER.match(parts[1]):
        return None
    return parts[1]


def droppable(resource_type: str, issues: Iterable[Issue]) -> tuple[str, ...] | None:
    """The members to drop so that every error goes away, or None when an error cannot be tolerated."""
    if resource_type not in READ_MEMBERS:
        return None
    members: list[str] = []
    for issue in issues:
        if issue.severity != "error":
            continue
        member = member_of(issue)
        if member is None or member.removeprefix("_") in NEVER_DROPPED or is_read(resource_type, member):
            return None
        if member.removeprefix("_") not in members:
            members.append(member.removeprefix("_"))
    return tuple(members) or None


def normalize_leniently(
    data: Any,
    options: NormalizeOptions | None = None,
    *,
    resolve: Mapping[str, Mapping[str, Any]] | None = None,
    raw: bytes | None = None,
) -> Lenient:
    """:func:`rules.normalize.normalize_resource`, then once more without the invalid unread members when the
    strict reading rejected the resource only for them (see the module docstring). ``raw``: ``data`` as JSON,
    when the caller has it (used for the strict reading only; the second reading is of other data)."""
    strict = normalize_resource(data, options, resolve=resolve, raw=raw)
    if strict.outcome != "rejected" or not isinstance(data, Mapping):
        return Lenient(strict)
    members = droppable(strict.resource_type, strict.issues)
    if members is None:
        return Lenient(strict)
    names = {*members, *(f"_{m}" for m in members)}
    again = normalize_resource({k: v for k, v in data.items() if k not in names}, options, resolve=resolve)
    if again.outcome == "rejected":
        return Lenient(strict)
    tolerated = tuple(i for i in strict.issues if i.severity == "error")
    return Lenient(again, members, tolerated)


def safe_path(path: str) -> str:
    """A FHIRPath-like location with any segment that is not an element name or an index replaced by ``?``
    (unknown members are named by the sender and could carry anything)."""
    return ".".join(p if _SAFE_SEGMENT.match(p) else "?" for p in path.split(".")) if path else ""


def describe(issue: Issue) -> tuple[str, str]:
    """(path, message) of an issue without the values it was about: quoted text, and anything in brackets
    or braces, is removed from the message, and so is the ``(at path)`` suffix. Safe for logs."""
    message = _AT_PATH.sub("", issue.message)
    message = _QUOTED.sub("…", message).strip()
    return safe_path(issue.path), message[:200]


__all__ = [
    "NEVER_DROPPED",
    "READ_MEMBERS",
    "Lenient",
    "describe",
    "droppable",
    "is_read",
    "member_of",
    "normalize_leniently",
    "safe_path",
]
