"""Which FHIR servers a CDS client may make this service query (``EHR_ALERTS_CDS_FHIR_SERVERS``).

Without a check, any authenticated EHR could name any ``fhirServer`` and have the service send requests there
(server-side request forgery towards internal hosts). An issuer listed in the setting may only name its
listed base URLs or URLs below them; unlisted issuers may name any server unless
``EHR_ALERTS_CDS_FHIR_SERVERS_STRICT`` is on. A refused server is never contacted: the call answers 412.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from config.settings import Settings

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(parts: SplitResult) -> tuple[str, str, int]:
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


def _dot_segments(path: str) -> bool:
    """``.`` / ``..`` segments, plain or percent-encoded, or an encoded slash: a server may resolve them out of
    the allowed prefix."""
    lowered = path.lower()
    return "%2e" in lowered or "%2f" in lowered or any(s in (".", "..") for s in path.split("/"))


def _below(url: str, base: str) -> bool:
    """``url`` is ``base`` or a path below it: same scheme, host and port, path prefix on a segment boundary."""
    try:
        target, allowed = urlsplit(url), urlsplit(base)
        if _origin(target) != _origin(allowed):
            return False
    except ValueError:
        return False
    if "@" in target.netloc or target.query or target.fragment or _dot_segments(target.path):
        return False
    prefix = allowed.path.rstrip("/")
    return target.path.rstrip("/") == prefix or target.path.startswith(prefix + "/")


def fhir_server_refusal(issuer: str, fhir_server: str | None, settings: Settings) -> str | None:
    """Why ``issuer`` may not have ``fhir_server`` queried (None when it may, or when no server is named)."""
    if fhir_server is None:
        return None
    allowed = settings.cds_fhir_servers.get(issuer)
    if allowed is None:
        if settings.cds_fhir_servers_strict:
            return "fhirServer is not allowed: no FHIR server is registered for this CDS client"
        return None
    if any(_below(fhir_server, base) for base in allowed):
        return None
    return "fhirServer is not one of the FHIR servers registered for this CDS client"
