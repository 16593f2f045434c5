"""Review API / page authentication: a user's JWT from the hospital's OIDC provider (or the dev issuer).

The token comes in ``Authorization: Bearer <JWT>`` or, for the server-rendered page, in the HttpOnly cookie
``ehr_alerts_session``. Roles come from the configured claim (a dotted path reaches nested claims):
``admin`` implies ``pharmacist`` and ``viewer``; ``pharmacist`` implies ``viewer``. No or bad token: bare 401;
valid token without the role: 403.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from config.settings import Settings, get_settings
from service.security.dev import DEV_ISSUER, ROLES, dev_key_set
from service.security.failures import record_failure
from service.security.identity import Identity, client_of, remember
from service.security.jwks import configured_key_set
from service.security.tokens import AuthFailure, bearer_token, unauthorized, unverified_header_and_claims, verify_signed

REALM = "review"
SESSION_COOKIE = "ehr_alerts_session"
# Asymmetric algorithms only (OIDC providers sign with RS256 by default); HS* and none are never accepted.
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"})
IMPLIED = {"admin": {"admin", "pharmacist", "viewer"}, "pharmacist": {"pharmacist", "viewer"}, "viewer": {"viewer"}}
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

# Declared for the OpenAPI schema ("Authorize" in /docs); the checks themselves are below.
_bearer_scheme = HTTPBearer(bearerFormat="JWT", scheme_name="reviewBearer", auto_error=False)
_cookie_scheme = APIKeyCookie(name=SESSION_COOKIE, scheme_name="reviewSession", auto_error=False)


@dataclass(frozen=True)
class Principal:
    """An authenticated review user. ``roles`` holds the effective roles (implied ones included)."""

    subject: str
    name: str | None
    roles: frozenset[str]
    issuer: str
    client: str | None = None

    @property
    def actor(self) -> str:
        """Who acted, for alert histories: ``user:<sub>``."""
        return f"user:{self.subject}"

    def identity(self) -> Identity:
        """As the audit records it."""
        return Identity("user", self.issuer, self.subject, self.client, self.name)


def effective_roles(granted: Iterable[str]) -> frozenset[str]:
    """Known roles with the ones they imply (unknown role names are ignored)."""
    result: set[str] = set()
    for role in granted:
        result |= IMPLIED.get(role, set())
    return frozenset(result)


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The value at a dotted claim path (``realm_access.roles``), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _role_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.replace(",", " ").split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _token(request: Request) -> str | None:
    """The header token if there is an Authorization header (even a bad one), else the session cookie."""
    token = bearer_token(request)
    if token is not None:
        return token
    return request.cookies.get(SESSION_COOKIE)


async def verify_review_token(token: str, settings: Settings) -> Principal:
    """Verify a review token against the configured issuer (and the dev issuer in the dev profile)."""
    header, unverified = unverified_header_and_claims(token)
    if header.get("alg") not in ALGORITHMS:
        raise AuthFailure("algorithm")
    issuer = unverified.get("iss")
    roles_claim = settings.review_roles_claim
    if issuer == DEV_ISSUER and settings.profile == "dev":
        keys: Any = dev_key_set(settings)
        roles_claim = "roles"  # what mint_token writes
    elif settings.review_issuer and settings.review_jwks and issuer == settings.review_issuer:
        keys = configured_key_set(settings.review_jwks, settings)
    else:
        raise AuthFailure("issuer")
    claims = await verify_signed(
        token,
        header,
        keys,
        algorithms=ALGORITHMS,
        issuer=issuer,
        audience=settings.review_audience,
        leeway=settings.jwt_leeway_seconds,
        required=("iss", "aud", "exp", "sub"),
    )
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise AuthFailure("claims")
    name = claims.get("name") or claims.get("preferred_username")
    return Principal(
        subject=subject,
        name=name if isinstance(name, str) else None,
        roles=effective_roles(_role_names(claim_at(claims, roles_claim))),
        issuer=issuer,
        client=client_of(claims),
    )


def _same_origin(request: Request, settings: Settings) -> bool:
    """For cookie-authenticated writes: the browser's Origin (when sent) must be this service's origin."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser cross-site request (SameSite=Strict keeps the cookie off those anyway)
    if settings.public_base_url:
        base = urlsplit(settings.public_base_url)
        expected = f"{base.scheme}://{base.netloc}"
    else:
        expected = f"{request.url.scheme}://{request.url.netloc}"
    return origin == expected


def require_role(*roles: str) -> Callable[..., Awaitable[Principal]]:
    """FastAPI dependency factory: the authenticated user, who must hold one of ``roles`` (none given: any
    known role). 401 without a valid token, 403 without the role."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown roles {unknown}; known: {', '.join(ROLES)}")
    wanted = frozenset(roles) or frozenset(ROLES)

    async def dependency(
        request: Request,
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
        _cookie: Annotated[str | None, Depends(_cookie_scheme)],
    ) -> Principal:
        settings = get_settings()
        token = _token(request)
        if token is None:
            raise unauthorized(REALM, "missing")
        try:
            principal = await verify_review_token(token, settings)
        except AuthFailure as failure:
            raise unauthorized(REALM, failure.reason) from None
        remember(request.scope, principal.identity())
        from_cookie = bearer_token(request) is None
        if from_cookie and request.method not in SAFE_METHODS and not _same_origin(request, settings):
            record_failure(REALM, "cross-origin")
            raise HTTPException(status_code=403, detail="Forbidden")
        if not principal.roles & wanted:
            record_failure(REALM, "role")
            raise HTTPException(status_code=403, detail="Forbidden")
        return principal

    dependency.__name__ = f"require_role_{'_'.join(sorted(wanted))}"
    return dependency


def set_session_cookie(response: Response, token: str, *, max_age: int | None = None) -> None:
    """Put a review token in the HttpOnly session cookie (Secure outside the dev profile, SameSite=Strict)."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max_age,
        httponly=True,
        secure=get_settings().profile != "dev",
        samesite="strict",
        path="/",
    )


def clear_session_cookie(response: Response) -> None:
    """Log out: remove the session cookie."""
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
