"""Feed clients (lab / EHR interfaces posting FHIR events): OAuth 2.0 bearer access tokens, the SMART
Backend Services pattern.

The hospital's authorization server (Keycloak, Microsoft Entra ID, Okta, Epic's or the interface engine's
own) issues the client a signed JWT access token (client credentials grant with a private_key_jwt client
assertion); ehr-alerts is the resource server and verifies it: signature by a key in the JWKS configured for
its ``iss`` (``EHR_ALERTS_FEED_ISSUERS``), ``aud`` = ``EHR_ALERTS_FEED_AUDIENCE``, ``exp`` / ``nbf``, then the
SMART v2 system scopes (``service.security.scopes``) per resource type and action. No or bad token: 401;
valid token without the scope: 403. In the dev profile the local dev issuer (``ehr-alerts token mint-feed``)
is trusted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from config.settings import Settings, get_settings
from service.security.dev import DEV_ISSUER, dev_key_set
from service.security.failures import record_failure
from service.security.identity import Identity, client_of, remember
from service.security.jwks import configured_key_set
from service.security.review import ALGORITHMS
from service.security.scopes import Scopes, parse_scopes, scope_name
from service.security.tokens import AuthFailure, bearer_token, unauthorized, unverified_header_and_claims, verify_signed

REALM = "feed"
WRITE_ACTIONS = ("c", "u", "d")
_bearer_scheme = HTTPBearer(
    bearerFormat="JWT",
    scheme_name="feedBearer",
    description="SMART Backend Services access token (JWT) with system scopes, e.g. system/Observation.cu",
    auto_error=False,
)


@dataclass(frozen=True)
class FeedClient:
    """An authenticated feed client and its granted scopes."""

    issuer: str
    subject: str
    client_id: str | None
    scopes: Scopes

    @property
    def actor(self) -> str:
        """Who acted: ``system:<client>``."""
        return f"system:{self.client_id or self.subject}"

    def identity(self) -> Identity:
        """As the audit records it."""
        return Identity("system", self.issuer, self.subject, self.client_id)


def is_feed_issuer(issuer: Any, settings: Settings) -> bool:
    """True when tokens of ``issuer`` are verified as feed tokens."""
    if not isinstance(issuer, str):
        return False
    return issuer in settings.feed_issuers or (issuer == DEV_ISSUER and settings.profile == "dev")


async def verify_feed_token(token: str, settings: Settings) -> FeedClient:
    """Verify a feed access token; raises AuthFailure with the reason."""
    header, unverified = unverified_header_and_claims(token)
    if header.get("alg") not in ALGORITHMS:
        raise AuthFailure("algorithm")
    issuer = unverified.get("iss")
    if not is_feed_issuer(issuer, settings):
        raise AuthFailure("issuer")
    assert isinstance(issuer, str)
    keys: Any = (
        dev_key_set(settings) if issuer == DEV_ISSUER else configured_key_set(settings.feed_issuers[issuer], settings)
    )
    claims = await verify_signed(
        token,
        header,
        keys,
        algorithms=ALGORITHMS,
        issuer=issuer,
        audience=settings.feed_audience,
        leeway=settings.jwt_leeway_seconds,
        required=("iss", "aud", "exp", "sub"),
    )
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise AuthFailure("claims")
    return FeedClient(issuer, subject[:256], client_of(claims), parse_scopes(claims))


async def feed_client(
    request: Request,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)] = None,
) -> FeedClient:
    """FastAPI dependency: the verified feed client (401 without a valid token)."""
    token = bearer_token(request)
    if token is None:
        raise unauthorized(REALM, "missing")
    try:
        client = await verify_feed_token(token, get_settings())
    except AuthFailure as failure:
        raise unauthorized(REALM, failure.reason) from None
    remember(request.scope, client.identity())
    return client


async def feed_writer(client: Annotated[FeedClient, Depends(feed_client)]) -> FeedClient:
    """FastAPI dependency: a feed client granted some write scope (create, update or delete); 403 otherwise.
    Each resource is then checked against its own scope (:func:`require`)."""
    if not client.scopes.allows_any(WRITE_ACTIONS):
        raise forbidden("the token grants no write scope (e.g. system/Observation.cu)")
    return client


def forbidden(message: str) -> HTTPException:
    """Count a scope refusal and build the 403."""
    record_failure(REALM, "scope")
    return HTTPException(status_code=403, detail=message)


def missing_scope(client: FeedClient, resource_type: str, actions: str) -> str | None:
    """None when any of ``actions`` on ``resource_type`` is granted, else the scope that is missing."""
    if any(client.scopes.allows(resource_type, a) for a in actions):
        return None
    return scope_name(resource_type, actions)
