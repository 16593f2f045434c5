"""JWT verification shared by the CDS Hooks and review realms: header checks, key lookup, signature, claims.

Every failure raises :class:`AuthFailure` with a short reason code (``service.security.failures.REASONS``);
the caller turns it into a bare 401. Tokens are never logged.
"""

from __future__ import annotations

from typing import Any, Protocol

import jwt
from fastapi import HTTPException, Request
from jwt import exceptions as jwt_errors

from service.security.failures import record_failure
from service.security.jwks import JwksUnavailable, Key

MAX_TOKEN_CHARS = 16 * 1024
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class AuthFailure(Exception):
    """A token was refused; ``reason`` is a short code for metrics and logs (never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeySource(Protocol):
    """Where verification keys come from (a JWKS file/URL or keys held in process)."""

    async def key(self, kid: str) -> Key | None: ...


def unauthorized(realm: str, reason: str) -> HTTPException:
    """Record the refusal and build the bare 401 (the body says nothing about which check failed)."""
    record_failure(realm, reason)
    return HTTPException(status_code=401, detail="Unauthorized", headers=BEARER_CHALLENGE)


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when there is no such header.

    A header with another scheme or without a token gives ``""`` (present but unusable)."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


def unverified_header_and_claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload before any check (to pick the issuer and key); raises AuthFailure("malformed")."""
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        raise AuthFailure("malformed")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt_errors.InvalidTokenError:
        raise AuthFailure("malformed") from None
    if not isinstance(claims, dict):
        raise AuthFailure("malformed")
    return header, claims


async def verify_signed(
    token: str,
    header: dict[str, Any],
    keys: KeySource,
    *,
    algorithms: frozenset[str],
    issuer: str,
    audience: str,
    leeway: int,
    required: tuple[str, ...],
) -> dict[str, Any]:
    """Check alg, find the key by kid, verify signature and the registered claims; the verified claims."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        raise AuthFailure("algorithm")
    if "crit" in header or header.get("b64", True) is not True:
        raise AuthFailure("malformed")  # RFC 7515 §4.1.11: extensions we do not implement must be refused
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AuthFailure("kid")
    try:
        key = await keys.key(kid)
    except JwksUnavailable:
        raise AuthFailure("jwks-unavailable") from None
    if key is None:
        raise AuthFailure("kid")
    if not key.fits(alg):
        raise AuthFailure("key-type")
    try:
        claims = jwt.decode(
            token,
            key.public_key,
            algorithms=[alg],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": list(required), "verify_iat": True, "verify_nbf": True},
        )
    except jwt_errors.ExpiredSignatureError:
        raise AuthFailure("expired") from None
    except jwt_errors.ImmatureSignatureError:
        raise AuthFailure("not-yet-valid") from None
    except jwt_errors.InvalidAudienceError:
        raise AuthFailure("audience") from None
    except jwt_errors.InvalidIssuerError:
        raise AuthFailure("issuer") from None
    except jwt_errors.InvalidSignatureError:
        raise AuthFailure("signature") from None
    except jwt_errors.InvalidAlgorithmError:
        raise AuthFailure("algorithm") from None
    except (jwt_errors.MissingRequiredClaimError, jwt_errors.InvalidIssuedAtError):
        raise AuthFailure("claims") from None
    except jwt_errors.InvalidTokenError:
        raise AuthFailure("malformed") from None
    return claims
