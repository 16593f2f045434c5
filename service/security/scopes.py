"""SMART on FHIR system scopes (SMART App Launch 2.x, "Backend Services"): what a feed client may do.

``system/Observation.cu`` grants create and update of Observations; ``system/*.cruds`` everything; the v1
forms ``system/Observation.write`` (= ``cud``), ``.read`` (= ``rs``) and ``.*`` are read as their v2
equivalents. Scopes with search restrictions (``system/Observation.rs?category=laboratory``) grant nothing
here: a restriction cannot be checked on a write, so such a scope is not widened into a full grant.
``patient/`` and ``user/`` scopes are not feed scopes and are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_SCOPE = re.compile(r"^system/(\*|[A-Z][A-Za-z]{0,63})\.(c?r?u?d?s?|read|write|\*)$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
ACTIONS = frozenset("cruds")
#: The FHIR resource type under which alerts are read (an alert is a clinical DetectedIssue).
ALERT_RESOURCE = "DetectedIssue"
MAX_SCOPES = 256


@dataclass(frozen=True)
class Scopes:
    """Granted (resource type or ``*``, action letter) pairs."""

    grants: frozenset[tuple[str, str]]

    def allows(self, resource_type: str, action: str) -> bool:
        """True when ``action`` (one of c r u d s) on ``resource_type`` is granted."""
        return (resource_type, action) in self.grants or ("*", action) in self.grants

    def allows_any(self, actions: Iterable[str]) -> bool:
        """True when any of ``actions`` is granted on some resource type."""
        wanted = set(actions)
        return any(action in wanted for _, action in self.grants)

    def text(self) -> str:
        """The grants as v2 scopes (for messages)."""
        by_type: dict[str, str] = {}
        for rtype, action in self.grants:
            by_type[rtype] = by_type.get(rtype, "") + action
        return " ".join(f"system/{t}.{''.join(a for a in 'cruds' if a in v)}" for t, v in sorted(by_type.items()))


def parse_scopes(claims: dict[str, Any]) -> Scopes:
    """The system scopes of an access token: ``scope`` (space-separated, RFC 9068) or ``scp`` (a list, as
    Microsoft Entra ID and Okta send)."""
    raw = claims.get("scope", claims.get("scp"))
    if isinstance(raw, str):
        names = raw.split()
    elif isinstance(raw, list):
        names = [n for n in raw if isinstance(n, str)]
    else:
        names = []
    grants: set[tuple[str, str]] = set()
    for name in names[:MAX_SCOPES]:
        match = _SCOPE.match(name)
        if not match:
            continue
        rtype, permissions = match.groups()
        for action in _V1.get(permissions, permissions):
            grants.add((rtype, action))
    return Scopes(frozenset(grants))


def scope_name(resource_type: str, actions: str) -> str:
    """The v2 scope that grants ``actions`` on ``resource_type``: ``system/Observation.cu``."""
    return f"system/{resource_type}.{actions}"
