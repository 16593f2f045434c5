"""What the service says about its security configuration when it starts."""

from __future__ import annotations

import logging

from config.settings import SANDBOX_ISSUER, Settings, get_settings

logger = logging.getLogger("ehr_alerts.security")


def security_startup_warnings(settings: Settings) -> list[str]:
    """Warnings about risky but valid security settings (auth off, dev profile, nothing trusted ...)."""
    warnings: list[str] = []
    if not settings.cds_auth_enabled:
        warnings.append(
            "CDS HOOKS AUTHENTICATION IS OFF (EHR_ALERTS_CDS_AUTH_ENABLED=false): anyone who can reach "
            "/cds-services can read patients' alerts and post feedback. Never run like this with real patient data."
        )
    if settings.profile == "dev":
        warnings.append(
            f"dev profile (EHR_ALERTS_PROFILE=dev): the public CDS Hooks sandbox issuer {SANDBOX_ISSUER}, whose "
            "private key is published, and the local dev review issuer are trusted. Never use with real patient data."
        )
    if settings.cds_auth_enabled and not settings.cds_issuers and settings.profile != "dev":
        warnings.append("no CDS client is trusted (EHR_ALERTS_CDS_ISSUERS is empty): every CDS Hooks call gets 401")
    if settings.cds_auth_enabled and settings.profile != "dev" and not settings.public_base_url:
        warnings.append(
            "EHR_ALERTS_PUBLIC_BASE_URL is not set: the JWT aud is checked against the scheme and Host header of "
            "each request; set it to the URL the EHR calls (required behind a proxy or TLS terminator)"
        )
    if settings.public_base_url and settings.public_base_url.startswith("http:") and settings.profile != "dev":
        warnings.append("EHR_ALERTS_PUBLIC_BASE_URL is http: CDS Hooks traffic must use TLS in production")
    unbound = sorted(set(settings.cds_issuers) - set(settings.cds_fhir_servers))
    if settings.cds_auth_enabled and unbound and not settings.cds_fhir_servers_strict and settings.profile != "dev":
        warnings.append(
            f"{len(unbound)} trusted CDS client(s) have no FHIR server allow-list (EHR_ALERTS_CDS_FHIR_SERVERS): the "
            "service queries whatever fhirServer they name; list their servers, then set "
            "EHR_ALERTS_CDS_FHIR_SERVERS_STRICT=true"
        )
    if not settings.review_issuer and settings.profile != "dev":
        warnings.append(
            "no review issuer (EHR_ALERTS_REVIEW_ISSUER / EHR_ALERTS_REVIEW_JWKS): the review API refuses everyone"
        )
    if not settings.feed_issuers and settings.profile != "dev":
        warnings.append("no feed issuer (EHR_ALERTS_FEED_ISSUERS is empty): every ingestion request gets 401")
    if settings.metrics_token is None and settings.profile != "dev":
        warnings.append("EHR_ALERTS_METRICS_TOKEN is not set: GET /metrics answers 401 to every scraper")
    if "*" in settings.cors_origins:
        warnings.append("CORS allows any origin (EHR_ALERTS_CORS_ORIGINS=*): dev only")
    return warnings


def log_security_warnings(settings: Settings | None = None) -> list[str]:
    """Log each startup warning at WARNING level (call once when the app starts); returns them."""
    warnings = security_startup_warnings(settings or get_settings())
    for line in warnings:
        logger.warning("SECURITY: %s", line)
    return warnings
