"""Runtime settings: one pydantic-settings model, from ``EHR_ALERTS_*`` environment variables (plus ``REDIS_URL``)
and an optional YAML file named by ``EHR_ALERTS_CONFIG_FILE``. Environment variables win over the file.

Every field is documented in the README's configuration table. Invalid configuration raises
:class:`SettingsError` at start, naming the setting and the problem.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "EHR_ALERTS_"
CONFIG_FILE_ENV = "EHR_ALERTS_CONFIG_FILE"

# The public CDS Hooks sandbox signs with a private key that is published on GitHub: anyone can forge its
# tokens, so it may be trusted in the dev profile only (service/security bundles its JWKS for that profile).
SANDBOX_ISSUER = "https://sandbox.cds-hooks.org"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_CLAIM_PATH = re.compile(r"^[A-Za-z0-9_:\-]+(\.[A-Za-z0-9_:\-]+)*$")


class SettingsError(ValueError):
    """Configuration that cannot be used; the message names each bad setting."""


class _YamlFileSource(PydanticBaseSettingsSource):
    """Settings from the YAML file named by ``EHR_ALERTS_CONFIG_FILE`` (keys are field names)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_FILE_ENV)
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"{CONFIG_FILE_ENV}={path}: cannot read the configuration file: {exc}") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"{CONFIG_FILE_ENV}={path}: the file must hold a mapping of setting names to values")
        unknown = sorted(set(data) - set(Settings.model_fields))
        if unknown:
            raise SettingsError(f"{CONFIG_FILE_ENV}={path}: unknown settings {', '.join(unknown)}")
        return data


def _json_mapping(value: Any, what: str) -> Any:
    """A mapping setting given as JSON text (environment variable): parsed; empty text is an empty mapping."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"must be a JSON object mapping {what} ({exc})") from None


class Settings(BaseSettings):
    """Every setting the workers and the service read; documented in the README."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore", populate_by_name=True)

    # --- storage and broker ---
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "EHR_ALERTS_REDIS_URL", "redis_url"),
        description="Redis for broker, timeline and alerts; unset: embedded mode (in-process fakeredis, Celery eager)",
    )
    key_prefix: str = Field(default="ehr", pattern=r"^[A-Za-z0-9_\-]{1,32}$", description="prefix of every Redis key")

    # --- stream pipeline ---
    include_preliminary: bool = Field(default=False, description="count preliminary lab results")
    visibility_timeout: float = Field(default=60.0, gt=0, description="seconds before an unacked task is redelivered")
    redelivery_timeout: float = Field(
        default=120.0,
        gt=0,
        le=86_400,
        description="seconds after which a batch accepted but not yet finished is delivered again (inbox "
        "sweep; workers sweep every quarter of it, at most every 10 s); a batch still queued then gets a "
        "second doorbell, a no-op",
    )
    batch_size: int = Field(default=200, ge=1, le=10_000, description="events per Celery task")
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="largest accepted request body")
    retention_lab_hours: float = Field(default=24 * 30, gt=0, description="how long lab facts are kept")
    retention_medication_hours: float = Field(default=24 * 30, gt=0, description="kept this long after a med ends")
    retention_condition_hours: float = Field(default=24 * 365, gt=0, description="kept this long after abatement")
    retention_open_medication_hours: float = Field(
        default=24 * 365,
        gt=0,
        description="a medication without an end date is kept this long after its start or its last update, "
        "whichever is later (a medication list entry nobody touched for that long is no longer evidence)",
    )
    retention_encounter_hours: float = Field(
        default=24 * 365,
        gt=0,
        description="an Encounter is kept this long after it ended (one in progress is kept until it ends); keep it "
        "at least as long as the rules' encounter_lookback_hours (365 days), or the stream forgets encounters a CDS "
        "Hooks call still sees; the Patient resource is kept as long as the patient has data",
    )

    retention_closed_alert_days: float = Field(
        default=90.0,
        gt=0,
        le=3660,
        description="a closed alert (resolved, retracted, expired, withdrawn) is removed from Redis this long after it "
        "closed, with its history list, its alert-index entries and its worklist summary (the due sweep removes a "
        "bounded number per sweep); the audit export covers the alerts still stored, so export the trail to your "
        "archive within this time",
    )
    retention_inactive_patient_days: float = Field(
        default=400.0,
        gt=0,
        le=36_600,
        description="a patient with no resource or delete received for this long (wall clock) and no alert left in "
        "Redis is forgotten: the whole timeline (open conditions, open medications and the Patient resource "
        "included), and the patient's entries in the patients-seen set, the worklist context and the resource index "
        "(the due sweep, a bounded number per sweep); keep it longer than the longest fact retention (365 days)",
    )
    fact_cache_size: int = Field(
        default=50_000,
        ge=0,
        le=10_000_000,
        description="resource versions whose parsed facts each worker process keeps (LRU; 0: no cache). Measured: "
        "~4 KB per version (50,000 is ~200 MB per worker process); a miss costs ~0.2 ms (JSON parse and "
        "validation), and an event reads its patient's whole window (~45 versions at a lab every 4 h, "
        "bench_growth.py), so a patient whose window was evicted costs ~9 ms more. Size it at the patients "
        "with events in a few minutes times ~50 (default: ~1,000 busy patients per worker)",
    )

    # --- rules ---
    site_profile: Path | None = Field(
        default=None,
        description="YAML site profile changing rule status, thresholds, windows and applicability without editing "
        "the rule files (validated against the rules at start; `ehr-alerts rules check --site FILE`); unset: the "
        "rules as shipped",
    )
    future_tolerance_hours: float = Field(
        default=24.0,
        ge=0,
        le=24 * 30,
        description="an event dated more than this after its receipt never moves a patient's clock: it is stored, "
        "flagged in the answer and counted, and counts only once the patient's time reaches it",
    )
    due_sweep_interval: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="seconds between the workers' sweeps for patients whose alerts are due for re-evaluation by "
        "time alone (evidence leaving a look-back, a future-dated result coming due)",
    )

    # --- CDS Hooks service (service/cds/) ---
    cds_fhir_timeout_seconds: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="hard limit for all FHIR server fetches of one CDS Hooks call; keys not fetched by then count as "
        "unavailable (stored alerts are still shown; 412 only when nothing can be said)",
    )
    cds_fhir_max_pages: int = Field(
        default=10, ge=1, le=1000, description="most Bundle pages followed (link next) per prefetch key"
    )
    cds_fhir_page_size: int = Field(
        default=100, ge=1, le=1000, description="_count used in prefetch templates and in the service's own searches"
    )
    cds_fhir_require_https: bool = Field(
        default=True,
        description="only query https fhirServer URLs (an http one is never contacted: the keys it should supply count "
        "as unavailable); turn off for loopback test servers only",
    )
    cds_card_ttl_hours: float = Field(
        default=72.0,
        gt=0,
        le=24 * 30,
        description="how long a card that came from a CDS Hooks call alone (no stored alert) is kept for feedback "
        "and keeps its uuid across calls",
    )
    cds_normalize_cache_size: int = Field(
        default=20_000,
        ge=0,
        le=1_000_000,
        description="resources whose normalisation (fhir.resources validation) is cached by content for CDS calls; "
        "0 turns the cache off",
    )

    cds_lean_read: bool = Field(
        default=True,
        description="read CDS Hooks prefetch, fetched resources and draft orders through lean models of only the "
        "members the rules read (rules/lean.py; full fhir.resources validation only for what they refuse); false: "
        "full validation of every resource, as at ingestion",
    )

    # --- CDS Hooks: FHIR server allow-list and process tuning (helper "cdsperf") ---
    cds_fhir_servers: Annotated[dict[str, list[str]], NoDecode] = Field(
        default_factory=dict,
        description="FHIR servers each CDS client may name: JSON object mapping issuer (JWT iss) to a list of "
        "allowed fhirServer base URLs (a URL allows itself and the paths below it, same scheme, host and port). "
        "A listed issuer's call naming another fhirServer answers 412 and that server is never contacted",
    )
    cds_fhir_servers_strict: bool = Field(
        default=False,
        description="true: an issuer not listed in EHR_ALERTS_CDS_FHIR_SERVERS may not name any fhirServer (412); "
        "false (default, eases onboarding): unlisted issuers may name any fhirServer, and the start-up log says so",
    )
    gc_freeze_at_start: bool = Field(
        default=True,
        description="after start-up (imports, rule catalog) of the API and of each worker process, move the "
        "start-up heap to the interpreter's permanent generation (gc.freeze) so full garbage collections, a pause "
        "of tens of ms each, no longer re-scan it",
    )
    gc_young_threshold: int = Field(
        default=50_000,
        ge=0,
        le=10_000_000,
        description="net new objects before a young garbage collection (gc.set_threshold generation 0) in the API "
        "and worker processes; higher means fewer in-flight request objects promoted to the old generation, so "
        "fewer full collections over the CDS normalisation cache. 0 keeps the interpreter's default (700)",
    )

    # --- operations: logs, health, metrics (issue 6, helper "ops") ---
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="level of the application loggers (third-party loggers never below INFO)"
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per line (production); text: human-readable lines"
    )
    log_hash_key: SecretStr | None = Field(
        default=None,
        description="secret key for the HMAC-SHA256 that pseudonymises patient ids in logs; unset: a random "
        "key per process (hashes then do not correlate across processes; a warning is logged)",
    )
    worker_heartbeat_interval: float = Field(
        default=10.0, gt=0, le=300, description="seconds between worker heartbeats (Redis and heartbeat file)"
    )
    worker_heartbeat_max_age: float = Field(
        default=60.0, gt=0, description="a worker whose last heartbeat is older than this is not alive / not seen"
    )
    worker_heartbeat_file: Path | None = Field(
        default=Path("/tmp/ehr-alerts-worker.heartbeat"),  # an emptyDir in the Helm chart
        description="file each worker touches on every heartbeat (`ehr-alerts worker-alive` checks it); empty: no file",
    )

    @field_validator("worker_heartbeat_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("worker_heartbeat_max_age")
    @classmethod
    def _max_age_covers_beats(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("worker_heartbeat_interval")
        if interval is not None and value < 2 * interval:
            raise ValueError(f"must be at least twice EHR_ALERTS_WORKER_HEARTBEAT_INTERVAL ({interval:g} s)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    # --- security (service/security: CDS Hooks client JWTs, review API tokens, CORS) ---
    profile: Literal["production", "dev"] = Field(
        default="production",
        description="dev: also trust the public CDS Hooks sandbox issuer and the local dev review issuer "
        "(urn:ehr-alerts:dev, `ehr-alerts token mint`); never use dev with real patient data",
    )
    cds_auth_enabled: bool = Field(
        default=True,
        description="require a CDS Hooks client JWT on discovery, services and feedback; false is logged loudly",
    )
    cds_issuers: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="trusted CDS clients: JSON object mapping issuer (JWT iss) to its JWKS (file path or https URL)",
    )
    cds_tenants: Annotated[dict[str, list[str]], NoDecode] = Field(
        default_factory=dict,
        description="optional: JSON object mapping issuer to the tenant ids it may use; a listed issuer's tokens "
        "must carry one of them in the tenant claim",
    )
    public_base_url: str | None = Field(
        default=None,
        description="external base URL of this service (e.g. https://cds.example.org); the JWT aud must be this "
        "plus the endpoint path. Unset: taken from the request (scheme and Host header)",
    )
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=300, description="clock skew allowed on exp, iat and nbf")
    cds_max_token_lifetime_seconds: int = Field(
        default=3600, ge=60, le=86400, description="CDS client JWTs living longer (exp - iat) are refused"
    )
    jwks_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="hard time limit for fetching a JWKS over https"
    )
    jwks_min_refresh_seconds: float = Field(
        default=60.0, ge=1, le=3600, description="a JWKS is re-read on an unknown kid at most this often"
    )
    jwks_max_age_seconds: float = Field(
        default=3600.0, ge=60, le=86400, description="an https JWKS is re-fetched when older than this"
    )
    jwks_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle to verify https JWKS servers (default: the system's trust store)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="browser origins allowed by CORS (JSON list or comma-separated, e.g. https://ehr.example.org); "
        "empty: no CORS; '*' is accepted in the dev profile only",
    )
    review_issuer: str | None = Field(
        default=None, description="issuer (iss) of review API tokens, e.g. the hospital's OIDC provider realm URL"
    )
    review_jwks: str | None = Field(
        default=None,
        validate_default=True,
        description="JWKS of the review issuer: file path or https URL (OIDC: the provider's jwks_uri)",
    )
    review_audience: str = Field(
        default="ehr-alerts", min_length=1, max_length=256, description="required aud of review API tokens"
    )
    review_roles_claim: str = Field(
        default="roles",
        description="claim holding the user's roles; a dotted path reaches nested ones (Keycloak: realm_access.roles)",
    )
    dev_key_file: Path = Field(
        default=Path("~/.local/state/ehr-alerts/dev-review-key.pem"),
        description="dev profile: private key signing local review tokens (created with mode 0600 on first use)",
    )

    # --- pharmacist review worklist, page, analytics (service/review, workers/state/review_index.py) ---
    review_page_size: int = Field(default=50, ge=1, le=500, description="worklist rows per page when not asked")
    review_scan_budget: int = Field(
        default=5000,
        ge=100,
        le=1_000_000,
        description="most index entries one worklist request walks for text/patient filters before it "
        "returns a (possibly short) page with a cursor to continue",
    )
    review_index_overlap_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="the worklist index re-reads alerts changed this many seconds before its watermark "
        "(covers clock skew between writers)",
    )
    review_snooze_max_hours: float = Field(
        default=168.0, gt=0, le=24 * 90, description="longest snooze a pharmacist may set"
    )
    review_ignored_after_hours: float = Field(
        default=24.0,
        gt=0,
        description="an alert nobody acted on counts as 'ignored' in the analytics once closed or open this long",
    )
    review_trend_days: float = Field(
        default=7.0, gt=0, le=90, description="days of K and Mg results shown in the alert detail trend"
    )
    review_poll_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="how often an open worklist page asks for new and escalated alerts (its 'n new' cue); 0: never",
    )

    # --- how people see times and units (review page, API display fields, card text) ---
    display_timezone: str = Field(
        default="UTC",
        description="IANA time zone (e.g. Europe/Berlin, America/New_York) of every time shown to people: the "
        "review page, the API's display fields and card text; data and exports stay ISO UTC",
    )
    display_mg_unit: Literal["mg/dL", "mmol/L"] = Field(
        default="mg/dL",
        description="unit magnesium is charted and shown in on the review page (the lab's own unit is shown beside)",
    )

    # --- edge limits, ingestion lane, feed clients, metrics, API docs, access audit (issue 12) ---
    max_json_depth: int = Field(
        default=64, ge=8, le=512, description="deepest JSON nesting accepted in a request body or ndjson line (400)"
    )
    max_number_chars: int = Field(
        default=40, ge=20, le=1000, description="longest JSON number accepted, in characters (400)"
    )
    max_bundle_entries: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="most entries in one Bundle, nested Bundles included (413; bulk loads use $import)",
    )
    max_ndjson_line_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="longest $import line; a longer line is rejected, the others kept"
    )
    ingest_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="threads that parse, validate and enqueue ingestion requests (the ingest lane), off the event loop",
    )
    ingest_max_requests: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="ingestion requests admitted at once per API process (running or waiting for a lane thread); "
        "more are answered 503 with Retry-After before their body is read",
    )
    api_routes: Literal["all", "cds", "ingest"] = Field(
        default="all",
        description="which routes this API process serves: all; cds (CDS Hooks, the pharmacist review and the alert "
        "read API, no /fhir ingestion); ingest (only the /fhir ingestion routes). Health, metrics and docs are served "
        "by every shape. Run one Deployment of each (same image) so ingestion bursts never share a process with "
        "CDS Hooks",
    )
    cds_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="threads that answer CDS Hooks calls and feedback (the cds lane: normalisation, rule engine and "
        "the alert store reads / writes), off the event loop",
    )
    cds_max_requests: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="CDS Hooks calls and feedback requests admitted at once per API process (running or waiting for a "
        "cds lane thread); more are answered 503 with Retry-After",
    )
    feed_issuers: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="trusted authorization servers of feed clients (SMART Backend Services): JSON object mapping "
        "issuer (access token iss) to its JWKS (file path or https URL)",
    )
    feed_audience: str = Field(
        default="ehr-alerts", min_length=1, max_length=256, description="required aud of feed access tokens"
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="bearer token Prometheus sends to GET /metrics; unset: /metrics answers 401 (open in the dev "
        "profile only)",
    )
    api_docs: bool = Field(
        default=True,
        description="serve /docs and /openapi.json (assets bundled, no CDN); production: signed-in review users "
        "only, dev profile: anyone",
    )
    audit_retention_days: float = Field(
        default=90.0,
        gt=0,
        le=3660,
        description="how long access AuditEvents are kept in Redis (export them to your archive before)",
    )

    @field_validator("feed_issuers")
    @classmethod
    def _feed_issuers_valid(cls, value: dict[str, str]) -> dict[str, str]:
        for issuer, jwks in value.items():
            if not issuer.strip() or len(issuer) > 2048:
                raise ValueError(f"issuer {issuer!r} must be a non-empty URI")
            kids = check_jwks_source(jwks, f"JWKS of feed issuer {issuer}")
            if SANDBOX_KID in kids:
                raise ValueError(f"JWKS of feed issuer {issuer} holds the public CDS Hooks sandbox key")
        return value

    @field_validator("cds_issuers", "feed_issuers", mode="before")
    @classmethod
    def _issuers_from_json(cls, value: Any) -> Any:
        return _json_mapping(value, "issuer to JWKS file or https URL")

    @field_validator("cds_issuers")
    @classmethod
    def _issuers_valid(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        production = info.data.get("profile", "production") == "production"
        for issuer, jwks in value.items():
            if not issuer.strip() or len(issuer) > 2048:
                raise ValueError(f"issuer {issuer!r} must be a non-empty URI")
            if production and issuer.rstrip("/") == SANDBOX_ISSUER:
                raise ValueError(
                    f"issuer {issuer}: the public CDS Hooks sandbox's private key is published, "
                    "so it is trusted in the dev profile only (EHR_ALERTS_PROFILE=dev)"
                )
            kids = check_jwks_source(jwks, f"JWKS of issuer {issuer}")
            if production and SANDBOX_KID in kids:
                raise ValueError(
                    f"JWKS of issuer {issuer} holds the public CDS Hooks sandbox key (kid {SANDBOX_KID}), "
                    "whose private key is published; it is trusted in the dev profile only"
                )
        return value

    @field_validator("cds_fhir_servers", mode="before")
    @classmethod
    def _fhir_servers_from_json(cls, value: Any) -> Any:
        return _json_mapping(value, "issuer to a list of FHIR base URLs")

    @field_validator("cds_fhir_servers")
    @classmethod
    def _fhir_servers_valid(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for issuer, urls in value.items():
            if not issuer.strip():
                raise ValueError("issuer must be a non-empty URI")
            for url in urls:
                problem = fhir_base_problem(url)
                if problem:
                    raise ValueError(f"issuer {issuer}: FHIR server {url!r} {problem}")
        return value

    @field_validator("cds_tenants", mode="before")
    @classmethod
    def _tenants_from_json(cls, value: Any) -> Any:
        return _json_mapping(value, "issuer to a list of tenant ids")

    @field_validator("cds_tenants")
    @classmethod
    def _tenants_valid(cls, value: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        issuers = set(info.data.get("cds_issuers") or {})
        if info.data.get("profile") == "dev":
            issuers.add(SANDBOX_ISSUER)
        for issuer, tenants in value.items():
            if issuer not in issuers:
                raise ValueError(f"issuer {issuer} is not in EHR_ALERTS_CDS_ISSUERS")
            if not tenants or not all(t.strip() for t in tenants):
                raise ValueError(f"issuer {issuer}: list at least one non-empty tenant id")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _base_url_valid(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("must be an absolute http(s) URL without query or fragment, e.g. https://cds.example.org")
        return value.strip().rstrip("/")

    @field_validator("jwks_ca_file")
    @classmethod
    def _ca_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list ({exc})") from None
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_valid(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for origin in value:
            if origin == "*":
                if info.data.get("profile", "production") != "dev":
                    raise ValueError("'*' (any origin) is accepted in the dev profile only; list the origins")
            elif not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path, no trailing slash)")
        return value

    @field_validator("review_issuer")
    @classmethod
    def _review_issuer_valid(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or len(value) > 2048):
            raise ValueError("must be a non-empty URI")
        return value or None

    @field_validator("review_jwks")
    @classmethod
    def _review_jwks_valid(cls, value: str | None, info: ValidationInfo) -> str | None:
        issuer = info.data.get("review_issuer")
        if value is None or not value.strip():
            if issuer:
                raise ValueError("EHR_ALERTS_REVIEW_ISSUER is set: give its JWKS (file path or https URL) too")
            return None
        if not issuer:
            raise ValueError("set EHR_ALERTS_REVIEW_ISSUER, the issuer these keys belong to")
        check_jwks_source(value, "review JWKS")
        return value

    @field_validator("site_profile", mode="before")
    @classmethod
    def _site_profile_empty(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("site_profile")
    @classmethod
    def _site_profile_readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("display_timezone")
    @classmethod
    def _timezone_known(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone name (e.g. Europe/Berlin, UTC)") from None
        return value

    @field_validator("review_roles_claim")
    @classmethod
    def _claim_path_valid(cls, value: str) -> str:
        if not _CLAIM_PATH.match(value):
            raise ValueError("must be a claim name or a dotted path such as realm_access.roles")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructor arguments, then environment, then the YAML file."""
        return init_settings, env_settings, _YamlFileSource(settings_cls)


def fhir_base_problem(url: str) -> str | None:
    """Why ``url`` cannot be an allowed FHIR base URL (None when it can): absolute http(s) with a host, no user
    info, query or fragment."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http(s) URL with a host"
    if "@" in parts.netloc or parts.query or parts.fragment:
        return "must not carry user info, a query or a fragment"
    return None


def check_jwks_source(source: str, what: str) -> set[str]:
    """Refuse a JWKS source that cannot work: an https URL, or a readable JWKS file with keys. Returns the
    file's key ids (empty for a URL, which is fetched when first needed)."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https"):
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{what} {source}: a JWKS URL must be https")
        return set()
    path = Path(source).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{what}: cannot read file {source} ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: file {source} is not JSON ({exc})") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) for k in keys):
        raise ValueError(f"{what}: file {source} is not a JWKS (an object with a non-empty 'keys' list)")
    return {str(k.get("kid")) for k in keys}


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one message that names each bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            env = "REDIS_URL" if name == "redis_url" else ENV_PREFIX + name.upper()
            problems.append(f"{env}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None


@cache
def get_settings() -> Settings:
    """Read the configuration once per process."""
    return load_settings()
