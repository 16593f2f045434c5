"""Access rules that span realms: alert reads (a review user or a feed client with a read scope), the
Prometheus scrape token, the API docs."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from config.settings import Settings, get_settings
from service.security.dev import DEV_ISSUER
from service.security.failures import record_failure
from service.security.feed import FeedClient, is_feed_issuer, verify_feed_token
from service.security.identity import Identity, remember
from service.security.review import SESSION_COOKIE, Principal, verify_review_token
from service.security.scopes import ALERT_RESOURCE
from service.security.tokens import AuthFailure, bearer_token, unauthorized, unverified_header_and_claims

READ_ROLES = frozenset({"viewer", "pharmacist", "admin"})
_bearer_scheme = HTTPBearer(
    bearerFormat="JWT",
    scheme_name="alertReader",
    description="a review token (viewer, pharmacist or admin) or a feed access token with system/DetectedIssue.r",
    auto_error=False,
)
_metrics_scheme = HTTPBearer(scheme_name="metricsToken", description="EHR_ALERTS_METRICS_TOKEN", auto_error=False)


def _is_review_issuer(issuer: Any, claims: dict[str, Any], settings: Settings) -> bool:
    if issuer == DEV_ISSUER and settings.profile == "dev":
        return "scope" not in claims and "scp" not in claims  # dev review tokens carry roles, feed tokens scopes
    return bool(settings.review_issuer) and issuer == settings.review_issuer


async def _reader(token: str, settings: Settings) -> Principal | FeedClient:
    _, claims = unverified_header_and_claims(token)
    issuer = claims.get("iss")
    if _is_review_issuer(issuer, claims, settings):
        return await verify_review_token(token, settings)
    if is_feed_issuer(issuer, settings):
        return await verify_feed_token(token, settings)
    raise AuthFailure("issuer")


async def alert_reader(
    request: Request,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)] = None,
) -> Identity:
    """FastAPI dependency for ``/alerts`` and ``/patients/...``: a review user with any role, or a feed client
    granted ``system/DetectedIssue.r`` (an alert is a FHIR DetectedIssue). 401 / 403 otherwise."""
    settings = get_settings()
    token = bearer_token(request)
    if token is None:
        raise unauthorized("review", "missing")
    try:
        caller = await _reader(token, settings)
    except AuthFailure as failure:
        raise unauthorized("review", failure.reason) from None
    identity = caller.identity()
    remember(request.scope, identity)
    if isinstance(caller, Principal) and caller.roles & READ_ROLES:
        return identity
    if isinstance(caller, FeedClient) and caller.scopes.allows(ALERT_RESOURCE, "r"):
        return identity
    feed = isinstance(caller, FeedClient)
    record_failure("feed" if feed else "review", "scope" if feed else "role")
    raise HTTPException(403, f"reading alerts needs a review role or the scope system/{ALERT_RESOURCE}.r")


async def metrics_reader(
    request: Request,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_metrics_scheme)] = None,
) -> None:
    """FastAPI dependency for ``/metrics``: ``Authorization: Bearer <EHR_ALERTS_METRICS_TOKEN>``. Without a
    configured token the endpoint is closed (401), except in the dev profile, where it is open."""
    settings = get_settings()
    expected = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if expected is None and settings.profile == "dev":
        return
    token = bearer_token(request)
    if token is None:
        raise unauthorized("metrics", "missing")
    if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise unauthorized("metrics", "signature")


async def docs_reader(request: Request) -> None:
    """FastAPI dependency for ``/docs`` and ``/openapi.json``: open in the dev profile; in production a review
    user (any role) by bearer token or the /review session cookie; 404 when ``EHR_ALERTS_API_DOCS=false``."""
    settings = get_settings()
    if not settings.api_docs:
        raise HTTPException(404, "Not Found")
    if settings.profile == "dev":
        return
    token = bearer_token(request) or request.cookies.get(SESSION_COOKIE)
    if not token:
        raise unauthorized("review", "missing")
    try:
        principal = await verify_review_token(token, settings)
    except AuthFailure as failure:
        raise unauthorized("review", failure.reason) from None
    if not principal.roles & READ_ROLES:
        record_failure("review", "role")
        raise HTTPException(403, "Forbidden")
