"""Who made a request, as the access audit records it: kept on the request by the authentication
dependencies (review users, feed clients, CDS clients) and read by the audit middleware."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

SCOPE_KEY = "ehr_alerts.identity"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: ``kind`` user (review), system (feed client) or ehr (CDS client); ``subject``
    the token's ``sub`` (a user id or a client id), ``client`` the OAuth client (``azp`` / ``client_id``),
    ``user`` a person named by a system caller (the CDS ``context.userId``), when known."""

    kind: str
    issuer: str
    subject: str
    client: str | None = None
    name: str | None = None
    user: str | None = None


def remember(scope: MutableMapping[str, Any], identity: Identity) -> None:
    """Record the verified caller on the request (the ASGI scope)."""
    scope[SCOPE_KEY] = identity


def identity_of(scope: MutableMapping[str, Any]) -> Identity | None:
    """The caller recorded on this request, if any."""
    found = scope.get(SCOPE_KEY)
    return found if isinstance(found, Identity) else None


def client_of(claims: dict[str, Any]) -> str | None:
    """The OAuth client of a token: ``azp`` (OIDC) or ``client_id`` (RFC 9068)."""
    for name in ("azp", "client_id"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value[:256]
    return None
