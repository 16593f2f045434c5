"""The one place the CDS Hooks endpoints get their client authentication from.

Placeholder until ``service.security`` (helper "sec") is on main: it accepts every call and names the client
``cds:unauthenticated``. It is replaced by ``from service.security import CdsClient, cds_client``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request


@dataclass(frozen=True)
class CdsClient:
    """The authenticated CDS client (placeholder shape of service.security.CdsClient)."""

    issuer: str
    subject: str | None = None
    tenant: str | None = None

    @property
    def actor(self) -> str:
        """Who did it, for alert history."""
        return f"cds:{self.issuer}"


async def cds_client(request: Request) -> CdsClient:
    """Placeholder dependency: no verification yet."""
    return CdsClient(issuer="unauthenticated")


__all__ = ["CdsClient", "cds_client"]
