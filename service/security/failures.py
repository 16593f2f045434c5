"""Why requests were refused: a counter per (realm, reason) and listeners the metrics code can connect.

Reasons never carry the token or any claim value; a listener gets only the realm ("cds" or "review") and a
short reason code (see :data:`REASONS`).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

logger = logging.getLogger("ehr_alerts.security")

REASONS = (
    "missing",  # no Authorization header / session cookie
    "malformed",  # not a JWT, bad header, wrong typ, too long
    "algorithm",  # alg not allowed (none, HS*, ...)
    "issuer",  # iss not trusted
    "kid",  # no key with this kid, even after refreshing the JWKS
    "key-type",  # the key does not fit the alg (e.g. RSA key for ES384)
    "jwks-unavailable",  # the issuer's JWKS could not be read
    "signature",  # signature does not verify
    "audience",  # aud is not the endpoint URL / the review audience
    "expired",  # exp passed
    "not-yet-valid",  # iat or nbf in the future
    "claims",  # a required claim is missing or has the wrong type
    "lifetime",  # exp - iat longer than allowed
    "tenant",  # tenant not allowed for this issuer (EHR_ALERTS_CDS_TENANTS)
    "replay",  # jti seen before
    "role",  # review: authenticated but lacks the role (403)
    "scope",  # feed: authenticated but the token lacks the SMART scope (403)
    "cross-origin",  # review: cookie-authenticated write from another origin (403)
)

Listener = Callable[[str, str], None]

_lock = threading.Lock()
_counts: Counter[tuple[str, str]] = Counter()
_listeners: list[Listener] = []


def on_failure(listener: Listener) -> None:
    """Call ``listener(realm, reason)`` on every refused request (e.g. to increment a Prometheus counter)."""
    with _lock:
        _listeners.append(listener)


def record_failure(realm: str, reason: str) -> None:
    """Count one refusal and tell the listeners; a failing listener is logged and otherwise ignored."""
    with _lock:
        _counts[(realm, reason)] += 1
        listeners = list(_listeners)
    logger.info("auth refused: realm=%s reason=%s", realm, reason)
    for listener in listeners:
        try:
            listener(realm, reason)
        except Exception:
            logger.exception("auth failure listener %r failed", listener)


def failure_counts() -> dict[tuple[str, str], int]:
    """Refusals so far in this process, by (realm, reason)."""
    with _lock:
        return dict(_counts)
