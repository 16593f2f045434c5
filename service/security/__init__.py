"""Security: CDS Hooks client JWTs, review API tokens and roles, CORS.

::

    from service.security import Principal, CdsClient, cds_client, require_role

    @app.post("/cds-services/{id}")
    async def call(id: str, client: Annotated[CdsClient, Depends(cds_client)]): ...

    @app.post("/review/alerts/{id}/override")
    async def override(id: str, user: Annotated[Principal, Depends(require_role("pharmacist"))]): ...
"""

from service.security.cds import CdsClient, cds_client, endpoint_url, trusted_issuers
from service.security.cors import install_cors
from service.security.failures import REASONS, failure_counts, on_failure
from service.security.review import (
    SESSION_COOKIE,
    Principal,
    clear_session_cookie,
    require_role,
    set_session_cookie,
    verify_review_token,
)
from service.security.startup import log_security_warnings, security_startup_warnings
from service.security.tokens import AuthFailure

__all__ = [
    "REASONS",
    "SESSION_COOKIE",
    "AuthFailure",
    "CdsClient",
    "Principal",
    "cds_client",
    "clear_session_cookie",
    "endpoint_url",
    "failure_counts",
    "install_cors",
    "log_security_warnings",
    "on_failure",
    "require_role",
    "security_startup_warnings",
    "set_session_cookie",
    "trusted_issuers",
    "verify_review_token",
]
