"""Every route of the app with its access rule: the one list a reviewer reads to see who may call what.

``tests/test_security_routes.py`` compares it with the app's routes (a new route that is not listed fails)
and calls every non-public route without credentials, with an untrusted issuer and with too few rights.
``anonymous`` is what a caller without credentials gets: 401 (APIs), 303 to the login form (pages), or
the answer itself for the public routes.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLIC = "public"
FEED_WRITE = "feed token, SMART system scope of each resource type and action (c / u / d)"
ALERT_READ = "review role (viewer, pharmacist, admin) or feed token with system/DetectedIssue.r"
CDS = "CDS Hooks client JWT (EHR_ALERTS_CDS_ISSUERS; aud = endpoint URL, jti once)"
VIEWER = "review token or session: viewer, pharmacist or admin"
PHARMACIST = "review token or session: pharmacist or admin"
ADMIN = "review token or session: admin"
METRICS = "Bearer EHR_ALERTS_METRICS_TOKEN (dev profile without a token: open)"
DOCS = "dev profile: open; production: review token or session (any role); EHR_ALERTS_API_DOCS=false: 404"


@dataclass(frozen=True)
class Access:
    """Who may call a route, and what an anonymous caller gets."""

    rule: str
    anonymous: int = 401


ROUTES: dict[tuple[str, str], Access] = {
    # ingestion (feed clients)
    ("POST", "/fhir"): Access(FEED_WRITE),
    ("POST", "/fhir/{resource_type}"): Access(FEED_WRITE),
    ("PUT", "/fhir/{resource_type}/{resource_id}"): Access(FEED_WRITE),
    ("DELETE", "/fhir/{resource_type}/{resource_id}"): Access(FEED_WRITE),
    ("POST", "/fhir/$import"): Access(FEED_WRITE),
    # alert reads
    ("GET", "/alerts"): Access(ALERT_READ),
    ("GET", "/patients/{patient_id}/alerts"): Access(ALERT_READ),
    ("GET", "/patients/{patient_id}/alerts/{alert_id}"): Access(ALERT_READ),
    # CDS Hooks (discovery too: under the CDS client JWT rules)
    ("GET", "/cds-services"): Access(CDS),
    ("POST", "/cds-services/{service_id}"): Access(CDS),
    ("POST", "/cds-services/{service_id}/feedback"): Access(CDS),
    # review API and page
    ("GET", "/api/review/alerts"): Access(VIEWER),
    ("GET", "/api/review/alerts/{alert_id}"): Access(VIEWER),
    ("GET", "/api/review/patients"): Access(VIEWER),
    ("GET", "/api/review/updates"): Access(VIEWER),
    ("POST", "/api/review/patients/{patient_id}/acknowledge"): Access(PHARMACIST),
    ("GET", "/api/review/data-problems"): Access(VIEWER),
    ("POST", "/api/review/data-problems/{item_id}/transitions"): Access(PHARMACIST),
    ("POST", "/api/review/alerts/{alert_id}/transitions"): Access(PHARMACIST),
    ("GET", "/api/review/analytics"): Access(ADMIN),
    ("GET", "/api/review/audit"): Access(ADMIN),
    ("GET", "/review"): Access(VIEWER, anonymous=303),
    ("GET", "/review/analytics"): Access(ADMIN, anonymous=303),
    ("POST", "/review/alerts/{alert_id}/{action}"): Access(PHARMACIST, anonymous=303),
    ("POST", "/review/patients/{patient_id}/acknowledge"): Access(PHARMACIST, anonymous=303),
    ("GET", "/review/data-problems"): Access(VIEWER, anonymous=303),
    ("POST", "/review/data-problems/{item_id}/{action}"): Access(PHARMACIST, anonymous=303),
    ("GET", "/review/login"): Access(PUBLIC, anonymous=200),  # the sign-in form
    ("POST", "/review/login"): Access(PUBLIC, anonymous=303),  # checks the token it is given
    ("POST", "/review/logout"): Access(PUBLIC, anonymous=303),  # clears the cookie
    ("GET", "/review/static"): Access(PUBLIC, anonymous=404),  # page CSS/JS (a mount)
    # access audit
    ("GET", "/audit/AuditEvent"): Access(ADMIN),
    # operations
    ("GET", "/healthz"): Access(PUBLIC, anonymous=200),
    ("GET", "/readyz"): Access(PUBLIC, anonymous=200),
    ("GET", "/metrics"): Access(METRICS),
    ("GET", "/openapi.json"): Access(DOCS),
    ("GET", "/docs"): Access(DOCS),
    ("GET", "/docs/assets"): Access(PUBLIC, anonymous=404),  # Swagger UI's own JS/CSS (a mount)
}


def is_public(method: str, path: str) -> bool:
    """True when the route needs no credentials."""
    access = ROUTES.get((method, path))
    return access is not None and access.rule == PUBLIC
