"""The local dev issuer (``urn:ehr-alerts:dev``): review tokens signed with a key file made on first use.

Trusted, and usable, only in the dev profile (``EHR_ALERTS_PROFILE=dev``). The key is an ES384 private key in
PEM, created with mode 0600; a key file readable by others is refused.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from config.settings import Settings, get_settings
from service.security.jwks import Key, StaticKeySet

DEV_ISSUER = "urn:ehr-alerts:dev"
DEV_ALGORITHM = "ES384"
ROLES = ("pharmacist", "viewer", "admin")


class DevProfileRequired(RuntimeError):
    """Dev tokens exist only in the dev profile."""


def _key_path(settings: Settings) -> Path:
    return settings.dev_key_file.expanduser()


def _create_key(path: Path) -> None:
    """Write a new key next to ``path`` and link it into place (atomic; another process may win the race)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)


_cache: dict[tuple[str, int], ec.EllipticCurvePrivateKey] = {}


def dev_private_key(settings: Settings | None = None) -> ec.EllipticCurvePrivateKey:
    """The dev signing key (created on first use); refuses outside the dev profile and unsafe key files."""
    settings = settings or get_settings()
    if settings.profile != "dev":
        raise DevProfileRequired("dev tokens are available in the dev profile only (EHR_ALERTS_PROFILE=dev)")
    path = _key_path(settings)
    if not path.exists():
        _create_key(path)
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"EHR_ALERTS_DEV_KEY_FILE={path}: readable by others (mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it"
        )
    ident = (str(path), info.st_mtime_ns)
    if ident not in _cache:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
            raise ValueError(f"EHR_ALERTS_DEV_KEY_FILE={path}: not an EC P-384 private key")
        _cache.clear()
        _cache[ident] = key
    return _cache[ident]


def _thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint of the public key (stable for a key file): the dev key's kid."""
    jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def dev_key_set(settings: Settings | None = None) -> StaticKeySet:
    """The dev issuer's public key, for verification."""
    public = dev_private_key(settings).public_key()
    kid = _thumbprint(public)
    return StaticKeySet({kid: Key(kid, public, DEV_ALGORITHM)})


def mint_token(subject: str, roles: Iterable[str], minutes: int = 60, name: str | None = None) -> str:
    """A review token from the dev issuer for ``subject`` with ``roles`` (pharmacist, viewer, admin)."""
    settings = get_settings()
    roles = sorted(set(roles))
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ValueError(f"roles must be among {', '.join(ROLES)} (got {', '.join(roles) or 'none'})")
    if not subject or not 1 <= minutes <= 24 * 60:
        raise ValueError("a subject is required and minutes must be between 1 and 1440")
    claims: dict[str, object] = {"roles": roles}
    if name:
        claims["name"] = name
    return _sign(settings, settings.review_audience, subject, minutes, claims)


def mint_feed_token(subject: str, scopes: Iterable[str], minutes: int = 60) -> str:
    """A feed access token from the dev issuer for client ``subject`` with SMART system ``scopes``
    (e.g. ``system/*.cud``), as a hospital's authorization server would issue it."""
    settings = get_settings()
    names = sorted({s for scope in scopes for s in scope.split()})
    if not subject or not names or not 1 <= minutes <= 24 * 60:
        raise ValueError("a subject and at least one scope are required; minutes must be between 1 and 1440")
    bad = [n for n in names if not n.startswith("system/")]
    if bad:
        raise ValueError(f"feed tokens carry system scopes only (got {', '.join(bad)})")
    return _sign(settings, settings.feed_audience, subject, minutes, {"client_id": subject, "scope": " ".join(names)})


def _sign(settings: Settings, audience: str, subject: str, minutes: int, extra: dict[str, object]) -> str:
    """A token from the dev issuer for ``audience`` and ``subject``, valid ``minutes`` from now, with ``extra``
    claims."""
    key = dev_private_key(settings)
    now = int(time.time())
    claims = {"iss": DEV_ISSUER, "aud": audience, "sub": subject, **extra}
    claims |= {"iat": now, "exp": now + minutes * 60, "jti": str(uuid.uuid4())}
    return jwt.encode(claims, key, algorithm=DEV_ALGORITHM, headers={"kid": _thumbprint(key.public_key())})
