"""CDS Hooks client authentication (CDS Hooks 2.0.1, "Trusting CDS Clients").

The EHR sends ``Authorization: Bearer <JWT>`` on discovery, service calls and feedback. The JWT is signed
with ES384 or RS384 by a key in the JWKS registered for its issuer; ``aud`` is the exact URL of the endpoint
called; ``exp``, ``iat`` and ``jti`` are required; a ``jti`` is accepted once (kept in Redis for the token's
lifetime). Any failure answers a bare 401.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import redis
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from config.settings import SANDBOX_ISSUER, Settings, get_settings
from service.security.identity import Identity, remember
from service.security.jwks import KeySet, configured_key_set
from service.security.tokens import AuthFailure, bearer_token, unauthorized, unverified_header_and_claims, verify_signed

REALM = "cds"
ALGORITHMS = frozenset({"ES384", "RS384"})
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")
MAX_JTI_CHARS = 512
_bearer_scheme = HTTPBearer(
    bearerFormat="JWT",
    scheme_name="cdsHooksClientJwt",
    description="CDS Hooks 2.0 client JWT (ES384/RS384, aud = the endpoint URL)",
    auto_error=False,
)


@dataclass(frozen=True)
class CdsClient:
    """The authenticated CDS client (an EHR): its issuer, the optional ``sub`` and ``tenant`` claims."""

    issuer: str
    subject: str | None = None
    tenant: str | None = None

    @property
    def actor(self) -> str:
        """Who acted, for alert histories: ``ehr:<iss>`` (plus ``#<sub>`` when the token names a subject)."""
        return f"ehr:{self.issuer}" + (f"#{self.subject}" if self.subject else "")

    def identity(self) -> Identity:
        """As the audit records it (the EHR; the user it acts for is added from the call's context)."""
        return Identity("ehr", self.issuer, self.subject or self.issuer, self.tenant)


ANONYMOUS = CdsClient(issuer="unauthenticated")


def sandbox_jwks_path() -> str:
    """The bundled public JWKS of the CDS Hooks sandbox (trusted in the dev profile only)."""
    return str(resources.files("service.security") / "data" / "sandbox-jwks.json")


def trusted_issuers(settings: Settings) -> dict[str, str]:
    """Issuer -> JWKS source: the configured ones, plus the public sandbox in the dev profile."""
    issuers = dict(settings.cds_issuers)
    if settings.profile == "dev":
        issuers.setdefault(SANDBOX_ISSUER, sandbox_jwks_path())
    return issuers


def _keys_for(settings: Settings, issuer: str) -> KeySet | None:
    issuers = trusted_issuers(settings)
    source = issuers.get(issuer)
    if source is None:
        return None
    return configured_key_set(source, settings)


def endpoint_url(request: Request, settings: Settings) -> str:
    """The exact URL the client called (no query): ``public_base_url`` + the path inside this app when
    configured, else the request's own scheme, host and path."""
    path = request.url.path
    if settings.public_base_url:
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return settings.public_base_url + path
    return f"{request.url.scheme}://{request.url.netloc}{path}"


def _replay_key(settings: Settings, issuer: str, jti: str) -> str:
    digest = hashlib.sha256(f"{issuer}\n{jti}".encode()).hexdigest()
    return f"{settings.key_prefix}:jti:{digest}"


async def _first_use(settings: Settings, issuer: str, jti: str, expires: float) -> bool:
    """Record the jti until the token expires (plus leeway); False when it was seen before. On the event loop
    with the asyncio client (``service.aredis``): a slow Redis never blocks other requests."""
    from service.aredis import get_async_redis

    ttl = max(1, int(expires - time.time()) + settings.jwt_leeway_seconds + 1)
    return bool(await get_async_redis().set(_replay_key(settings, issuer, jti), "1", nx=True, ex=ttl))


async def verify_cds_token(token: str, audience: str, settings: Settings) -> CdsClient:
    """Verify a CDS client JWT for the endpoint ``audience``; raises AuthFailure with the reason."""
    header, unverified = unverified_header_and_claims(token)
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise AuthFailure("malformed")
    if header.get("alg") not in ALGORITHMS:  # before anything else: none / HS* never get further
        raise AuthFailure("algorithm")
    issuer = unverified.get("iss")
    keys = _keys_for(settings, issuer) if isinstance(issuer, str) else None
    if keys is None:
        raise AuthFailure("issuer")
    claims = await verify_signed(
        token,
        header,
        keys,
        algorithms=ALGORITHMS,
        issuer=issuer,
        audience=audience,
        leeway=settings.jwt_leeway_seconds,
        required=REQUIRED_CLAIMS,
    )
    return await _checked_client(claims, issuer, settings)


async def _checked_client(claims: dict[str, Any], issuer: str, settings: Settings) -> CdsClient:
    jti, exp, iat = claims["jti"], claims["exp"], claims["iat"]
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
        raise AuthFailure("claims")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (exp, iat)):
        raise AuthFailure("claims")  # PyJWT accepts numeric strings; we want NumericDate numbers
    if exp - iat > settings.cds_max_token_lifetime_seconds:
        raise AuthFailure("lifetime")
    subject, tenant = claims.get("sub"), claims.get("tenant")
    allowed_tenants = settings.cds_tenants.get(issuer)
    if allowed_tenants is not None and tenant not in allowed_tenants:
        raise AuthFailure("tenant")
    try:
        first = await _first_use(settings, issuer, jti, exp)
    except redis.RedisError as exc:
        raise HTTPException(503, "replay check unavailable") from exc
    if not first:
        raise AuthFailure("replay")
    return CdsClient(
        issuer=issuer,
        subject=subject if isinstance(subject, str) and subject else None,
        tenant=tenant if isinstance(tenant, str) and tenant else None,
    )


async def cds_client(
    request: Request,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)] = None,
) -> CdsClient:
    """FastAPI dependency for the CDS Hooks endpoints (discovery, services, feedback): the verified client.

    Answers a bare 401 (``WWW-Authenticate: Bearer``) on any failure. With
    ``EHR_ALERTS_CDS_AUTH_ENABLED=false`` every caller is let in as ``CdsClient("unauthenticated")``.
    (``_documented`` only declares the scheme in the OpenAPI schema; the header is read and checked here.)
    """
    settings = get_settings()
    if not settings.cds_auth_enabled:
        remember(request.scope, Identity("ehr", "unauthenticated", "unauthenticated"))
        return ANONYMOUS
    token = bearer_token(request)
    if token is None:
        raise unauthorized(REALM, "missing")
    try:
        client = await verify_cds_token(token, endpoint_url(request, settings), settings)
    except AuthFailure as failure:
        raise unauthorized(REALM, failure.reason) from None
    remember(request.scope, client.identity())
    return client
