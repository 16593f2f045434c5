"""JSON Web Key Sets: read from a file or fetched over https, cached, re-read on an unknown ``kid``.

A refresh triggered by an unknown ``kid`` happens at most once per ``min_refresh`` seconds per source, so a
stream of forged tokens with random ``kid`` values cannot make us hammer the issuer's server. Only signing
keys of asymmetric types are kept (``oct`` keys are dropped: HMAC is never accepted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from config.settings import Settings

logger = logging.getLogger("ehr_alerts.security")

MAX_JWKS_BYTES = 1024 * 1024
_ASYMMETRIC = ("EC", "RSA", "OKP")
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


class JwksUnavailable(Exception):
    """The key set could not be read and no earlier copy is cached."""


@dataclass(frozen=True)
class Key:
    """One verification key: its id, the public key object, and the ``alg`` the JWK pins (if any)."""

    kid: str
    public_key: Any
    alg: str | None

    def fits(self, alg: str) -> bool:
        """True when this key may verify a signature made with ``alg`` (type, curve and size checked)."""
        if self.alg is not None and self.alg != alg:
            return False
        key = self.public_key
        if alg in _CURVES:
            return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _CURVES[alg]
        if alg[:2] in ("RS", "PS"):
            return isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048
        if alg == "EdDSA":
            return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
        return False


def parse_jwks(data: Any, origin: str) -> dict[str, Key]:
    """The usable signing keys of a JWKS document, by kid. Keys without kid, encryption keys and symmetric
    keys are skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{origin}: not a JWKS (no 'keys' list)")
    keys: dict[str, Key] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") not in _ASYMMETRIC:
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK(jwk).key
        except (PyJWTError, ValueError, TypeError, KeyError) as exc:
            logger.warning("%s: key %s skipped: %s", origin, kid, exc)
            continue
        if hasattr(key, "public_key"):  # a private JWK by mistake: keep only the public half
            key = key.public_key()
        alg = jwk.get("alg") if isinstance(jwk.get("alg"), str) else None
        keys[kid] = Key(kid, key, alg)
    return keys


def is_url(source: str) -> bool:
    """True when the JWKS source is a URL rather than a file path."""
    return urlsplit(source).scheme in ("http", "https")


class KeySet:
    """The keys of one JWKS source (a file path or an https URL), cached."""

    def __init__(
        self,
        source: str,
        *,
        timeout: float = 5.0,
        min_refresh: float = 60.0,
        max_age: float = 3600.0,
        ca_file: Path | None = None,
    ) -> None:
        self.source = source
        self.timeout, self.min_refresh, self.max_age, self.ca_file = timeout, min_refresh, max_age, ca_file
        self.fetches = 0  # how many times the source was read (tests and diagnostics)
        self._keys: dict[str, Key] | None = None
        self._loaded_at = 0.0  # monotonic time of the last successful read
        self._tried_at: float | None = None  # monotonic time of the last read attempt
        self._kid_refresh_at: float | None = None  # ... of the last one caused by an unknown kid
        self._file_stamp: tuple[int, int] | None = None
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    async def key(self, kid: str) -> Key | None:
        """The key with this kid, re-reading the source once (rate-limited) when it is unknown."""
        remote = is_url(self.source)
        if self._needs_reload():
            # files are cheap to re-read; a URL is retried at most once per min_refresh (also when failing)
            await self._reload(limit_since=self._tried_at if remote else None)
        if self._keys is None:
            raise JwksUnavailable(self.source)
        if kid not in self._keys and remote:  # a file is re-read whenever it changes (see _needs_reload)
            await self._reload(limit_since=self._kid_refresh_at, kid_refresh=True)
        return self._keys.get(kid)

    def _needs_reload(self) -> bool:
        if self._tried_at is None:
            return True
        if is_url(self.source):
            return self._keys is None or time.monotonic() - self._loaded_at > self.max_age
        return self._stamp() != self._file_stamp  # updated on every attempt: a broken file is read once

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = Path(self.source).expanduser().stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def _reload(self, *, limit_since: float | None, kid_refresh: bool = False) -> None:
        """Read the source, unless another request just did or the last such read was under min_refresh ago.
        A failed read keeps the keys cached so far."""
        tried = self._tried_at
        async with self._lock():
            if self._tried_at != tried:  # another request re-read it while we waited
                return
            now = time.monotonic()
            if limit_since is not None and now - limit_since < self.min_refresh:
                return
            self._tried_at = now
            if kid_refresh:
                self._kid_refresh_at = now
            self.fetches += 1
            remote = is_url(self.source)
            if not remote:
                self._file_stamp = self._stamp()
            try:
                keys = parse_jwks(await self._fetch() if remote else self._read_file(), self.source)
            except Exception as exc:  # whatever the remote or the file does, auth answers 401, never 500
                logger.warning(
                    "JWKS %s could not be read (%s: %s); keeping the cached keys", self.source, type(exc).__name__, exc
                )
                return
            self._keys, self._loaded_at = keys, time.monotonic()

    def _read_file(self) -> Any:
        text = Path(self.source).expanduser().read_text(encoding="utf-8")
        return json.loads(text)

    async def _fetch(self) -> Any:
        if urlsplit(self.source).scheme != "https":
            raise ValueError("JWKS URLs must be https")
        verify: ssl.SSLContext | bool = True
        if self.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.ca_file.expanduser()))
        with anyio.fail_after(self.timeout):
            async with (
                httpx.AsyncClient(timeout=self.timeout, verify=verify, follow_redirects=False) as client,
                client.stream("GET", self.source, headers={"Accept": "application/json"}) as response,
            ):
                if response.status_code != 200:
                    raise ValueError(f"HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
        return json.loads(bytes(body))


class StaticKeySet:
    """Keys known in process (the dev issuer's key): same interface as :class:`KeySet`."""

    def __init__(self, keys: dict[str, Key]) -> None:
        self._keys = keys

    async def key(self, kid: str) -> Key | None:
        """The key with this kid, if any."""
        return self._keys.get(kid)


_registry: dict[tuple[Any, ...], KeySet] = {}


def key_set(source: str, *, timeout: float, min_refresh: float, max_age: float, ca_file: Path | None) -> KeySet:
    """The shared, cached key set of a source (one per source and options in this process)."""
    ident = (source, timeout, min_refresh, max_age, ca_file)
    found = _registry.get(ident)
    if found is None:
        found = _registry[ident] = KeySet(
            source, timeout=timeout, min_refresh=min_refresh, max_age=max_age, ca_file=ca_file
        )
    return found


def clear_key_sets() -> None:
    """Forget every cached key set (tests)."""
    _registry.clear()


def configured_key_set(source: str, settings: Settings) -> KeySet:
    """:func:`key_set` for ``source`` with the JWKS fetch options from the settings."""
    return key_set(
        source,
        timeout=settings.jwks_timeout_seconds,
        min_refresh=settings.jwks_min_refresh_seconds,
        max_age=settings.jwks_max_age_seconds,
        ca_file=settings.jwks_ca_file,
    )
