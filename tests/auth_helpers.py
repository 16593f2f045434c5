"""Test tokens: a CDS client issuer with fresh keys (:class:`TestIssuer`) and review API tokens
(:func:`review_env`, :func:`review_token`).

CDS Hooks, in-process (monkeypatch the env and clear the settings cache) or for a subprocess app::

    issuer = TestIssuer(tmp_path)                 # ES384 and RS384 keys, JWKS file in tmp_path
    env = issuer.env()                            # EHR_ALERTS_CDS_ISSUERS etc.
    headers = issuer.headers(f"{base}/cds-services/mg-k-patient-view")   # aud = exact endpoint URL

Review API::

    env = review_env(tmp_path)                    # trust the test review issuer (JWKS file in tmp_path)
    headers = {"Authorization": f"Bearer {review_token('alice', ['pharmacist'])}"}
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm


def _public_jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    public = private_key.public_key()
    algorithm = ECAlgorithm if alg.startswith("ES") else RSAAlgorithm
    jwk = algorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": alg}


def _new_key(alg: str) -> Any:
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"no test key type for {alg}")


class TestIssuer:
    """A trusted CDS client (an EHR) for tests: private keys, a JWKS file, token factory.

    ``algs`` lists the algorithms to hold a key for (default ES384 and RS384); :meth:`token` signs with the
    first unless ``alg=`` says otherwise.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        tmp_path: Path,
        *,
        issuer: str | None = None,
        algs: Iterable[str] = ("ES384", "RS384"),
        name: str = "ehr",
    ) -> None:
        self.issuer = issuer or f"https://{name}-{uuid.uuid4().hex[:8]}.test/fhir"
        self.keys: dict[str, tuple[str, Any]] = {}  # alg -> (kid, private key)
        for alg in algs:
            self.keys[alg] = (f"{name}-{alg.lower()}-{uuid.uuid4().hex[:8]}", _new_key(alg))
        self.default_alg = next(iter(self.keys))
        self.jwks_path = Path(tmp_path) / f"{name}-{uuid.uuid4().hex[:8]}-jwks.json"
        self.write_jwks()

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWKS (what the issuer publishes)."""
        return {"keys": [_public_jwk(key, kid, alg) for alg, (kid, key) in self.keys.items()]}

    def write_jwks(self) -> Path:
        """(Re)write the JWKS file, e.g. after :meth:`rotate`."""
        self.jwks_path.write_text(json.dumps(self.jwks), encoding="utf-8")
        return self.jwks_path

    def rotate(self, alg: str | None = None) -> str:
        """Replace the key of ``alg`` with a fresh one (kid changes); the JWKS file is NOT rewritten."""
        alg = alg or self.default_alg
        kid = f"rotated-{alg.lower()}-{uuid.uuid4().hex[:8]}"
        self.keys[alg] = (kid, _new_key(alg))
        return kid

    def kid(self, alg: str | None = None) -> str:
        """The current key id for ``alg``."""
        return self.keys[alg or self.default_alg][0]

    def env(self, *others: TestIssuer, public_base_url: str | None = None, jwks: str | None = None) -> dict[str, str]:
        """Environment variables that make an app trust this issuer (and ``others``) for CDS Hooks.

        ``jwks`` replaces this issuer's JWKS source (e.g. an https URL serving :attr:`jwks`)."""
        issuers = {self.issuer: jwks or str(self.jwks_path)}
        for other in others:
            issuers[other.issuer] = str(other.jwks_path)
        env = {"EHR_ALERTS_CDS_AUTH_ENABLED": "true", "EHR_ALERTS_CDS_ISSUERS": json.dumps(issuers)}
        if public_base_url:
            env["EHR_ALERTS_PUBLIC_BASE_URL"] = public_base_url
        return env

    def token(
        self,
        aud: str | list[str],
        *,
        alg: str | None = None,
        key: Any = None,
        headers: dict[str, Any] | None = None,
        lifetime: int = 300,
        **claims: Any,
    ) -> str:
        """A signed CDS client JWT for endpoint ``aud``.

        Defaults: iss = this issuer, iat = now, exp = now + ``lifetime``, fresh jti, header kid/typ. Any claim
        can be overridden by keyword; pass ``claim=None`` to leave a claim out. ``alg`` picks the key (or, with
        ``key=``, signs with that key/secret, e.g. HS256 with a shared secret); ``headers`` are merged into
        (and override) the JWT header."""
        alg = alg or self.default_alg
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": aud,
            "iat": now,
            "exp": now + lifetime,
            "jti": str(uuid.uuid4()),
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        if key is None:
            kid, key = self.keys[alg]
        else:
            kid = self.kid() if self.keys else "none"
        header = {"kid": kid, "typ": "JWT", **(headers or {})}
        return jwt.encode(payload, key, algorithm=alg, headers=header)

    def headers(self, aud: str, **kwargs: Any) -> dict[str, str]:
        """``{"Authorization": "Bearer <token>"}`` for endpoint ``aud`` (keywords as in :meth:`token`)."""
        return {"Authorization": f"Bearer {self.token(aud, **kwargs)}"}


def unsigned_token(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """An ``alg: none`` JWT (no signature) with these claims."""
    return jwt.encode(claims, None, algorithm="none", headers=header)


# --- review API -------------------------------------------------------------------------------------------

REVIEW_ISSUER = "https://idp.test/realms/hospital"
REVIEW_AUDIENCE = "ehr-alerts"
_review_key: Any = None
_review_kid = "review-test-rs256"


def _review_private_key() -> Any:
    global _review_key
    if _review_key is None:
        _review_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _review_key


def review_jwks() -> dict[str, Any]:
    """The test review issuer's public JWKS (one RS256 key, as an OIDC provider publishes)."""
    return {"keys": [_public_jwk(_review_private_key(), _review_kid, "RS256")]}


def review_env(tmp_path: Path) -> dict[str, str]:
    """Environment variables that make an app trust the test review issuer (JWKS file written to tmp_path)."""
    path = Path(tmp_path) / "review-jwks.json"
    path.write_text(json.dumps(review_jwks()), encoding="utf-8")
    return {
        "EHR_ALERTS_REVIEW_ISSUER": REVIEW_ISSUER,
        "EHR_ALERTS_REVIEW_JWKS": str(path),
        "EHR_ALERTS_REVIEW_AUDIENCE": REVIEW_AUDIENCE,
    }


def review_token(
    sub: str | None, roles: Iterable[str] | None, *, name: str | None = None, minutes: int = 60, **claims: Any
) -> str:
    """A review token from the test review issuer (roles in the top-level ``roles`` claim). Keywords
    override claims; ``None`` (for sub, roles or a keyword) leaves that claim out."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": REVIEW_ISSUER,
        "aud": REVIEW_AUDIENCE,
        "sub": sub,
        "roles": list(roles) if roles is not None else None,
        "iat": now,
        "exp": now + minutes * 60,
        "jti": str(uuid.uuid4()),
    }
    if name:
        payload["name"] = name
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, _review_private_key(), algorithm="RS256", headers={"kid": _review_kid})


def review_headers(sub: str | None, roles: Iterable[str] | None, **kwargs: Any) -> dict[str, str]:
    """``{"Authorization": "Bearer <review token>"}``."""
    return {"Authorization": f"Bearer {review_token(sub, roles, **kwargs)}"}
