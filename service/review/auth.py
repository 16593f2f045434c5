"""Who may do what on the review API and page. The ONE place the review code binds to the security module.

PLACEHOLDER until ``service.security`` (helper "sec") is on main: every request is refused with 401 unless
a test overrides these dependencies (``app.dependency_overrides``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import HTTPException, Request

SESSION_COOKIE = "ehr_alerts_session"
CSRF_COOKIE = "ehr_alerts_csrf"


@dataclass(frozen=True)
class Principal:
    """An authenticated user (placeholder shape of ``service.security.Principal``)."""

    subject: str
    name: str | None
    roles: frozenset[str]
    issuer: str

    @property
    def actor(self) -> str:
        """How the user is named in alert histories."""
        return f"user:{self.subject}"


def require_role(*roles: str) -> Callable[[Request], Awaitable[Principal]]:
    """Placeholder dependency factory: always 401."""

    async def dependency(request: Request) -> Principal:
        raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})

    return dependency


#: read the worklist, details and page (every role)
reader = require_role("viewer", "pharmacist", "admin")
#: act on alerts
pharmacist = require_role("pharmacist")
#: analytics and audit exports
admin = require_role("admin")
