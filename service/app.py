"""The FastAPI application: FHIR ingestion, alert read API, CDS Hooks, review, audit, health, metrics, docs.

Every route's access rule is declared in ``service/security/inventory.py`` (a test compares it with the
routes); errors are FHIR OperationOutcomes (``service/errors.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query
from fastapi.responses import JSONResponse

from config.process import freeze_startup_heap
from config.settings import get_settings
from service import apidocs, errors
from service.audit import install as install_audit
from service.cds.router import router as cds_router
from service.errors import FhirError
from service.ingest_http import ID_PATTERN
from service.ingest_http import router as ingest_router
from service.observability import install as install_observability
from service.observability import readiness_response
from service.review import install as install_review
from service.review.patients import install as install_patients
from service.review.patients import stored_directory
from service.security import install_cors, log_security_warnings
from service.security.access import alert_reader
from service.security.identity import Identity
from workers.pipeline import get_store
from workers.state.statuses import STATUSES

MAX_CURSOR = 10_000_000

app = FastAPI(
    title="ehr-alerts",
    version="0.1.0",
    description="FHIR R4 Mg/K alerting: event ingestion, alerts, CDS Hooks, pharmacist review.",
    docs_url=None,  # served by service/apidocs.py (local assets, access rule)
    redoc_url=None,
    openapi_url=None,
)
install_cors(app)  # EHR_ALERTS_CORS_ORIGINS allow-list (browser-based CDS clients)
install_audit(app)  # AuditEvent per patient-data access (inside the observability middleware)
install_observability(app)  # JSON logs, request ids, GET /metrics (outermost middleware: sees every request)
errors.install(app)  # every error an OperationOutcome; Redis down -> 503 + Retry-After
log_security_warnings()  # auth off, dev profile, nothing trusted ... said loudly at start

ROUTES = get_settings().api_routes  # all | cds | ingest (EHR_ALERTS_API_ROUTES): one shape per Deployment
SERVES_CDS, SERVES_INGEST = ROUTES in ("all", "cds"), ROUTES in ("all", "ingest")
if SERVES_CDS:
    app.include_router(cds_router)  # CDS Hooks: /cds-services (service/cds/)
if SERVES_INGEST:
    app.include_router(ingest_router)  # FHIR ingestion: /fhir (service/ingest_http.py)
# GC tuning once started; registered after the CDS router, so it runs after the catalog warm-up
app.router.add_event_handler("startup", freeze_startup_heap)

Reader = Annotated[Identity, Depends(alert_reader)]


# --- alert read API ---------------------------------------------------------------------------------------


def _alerts_api(app: FastAPI) -> None:
    app.get("/alerts", tags=["alerts"])(list_alerts)
    app.get("/patients/{patient_id}/alerts", tags=["alerts"])(patient_alerts)
    app.get("/patients/{patient_id}/alerts/{alert_id}", tags=["alerts"])(get_alert)


def list_alerts(
    _: Reader,
    status: Annotated[str | None, Query(pattern=f"^({'|'.join(STATUSES)})$", description="one alert status")] = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[int, Query(ge=0, le=MAX_CURSOR)] = 0,
) -> dict[str, Any]:
    """Hospital-wide alerts, most recently changed first; filter by status and rule; cursor pagination."""
    page, next_cursor = get_store().list_alerts(status=status, rule=rule, limit=limit, cursor=cursor)
    return {"alerts": page, "next_cursor": next_cursor}


def patient_alerts(_: Reader, patient_id: str, open_only: bool = True) -> dict[str, Any]:
    """A patient's alerts (open ones by default)."""
    if not ID_PATTERN.match(patient_id):
        raise FhirError(400, f"invalid patient id {patient_id[:80]!r}", "patient_id")
    return {"alerts": get_store().alerts_for_patient(patient_id, open_only=open_only)}


def get_alert(_: Reader, patient_id: str, alert_id: str) -> dict[str, Any]:
    """One alert with its evidence and history."""
    alert = (
        get_store().get_alert(patient_id, alert_id)
        if ID_PATTERN.match(patient_id) and ID_PATTERN.match(alert_id)
        else None
    )
    if alert is None:
        raise FhirError(404, "no such alert", "alert_id", code="not-found")
    return alert


if SERVES_CDS:
    _alerts_api(app)  # /alerts, /patients/{id}/alerts[/{alert id}]
    install_review(app)  # pharmacist review: /api/review (JSON), /review (page)
apidocs.install(app)  # /docs, /openapi.json: local assets, dev profile or signed-in users
install_patients(stored_directory())  # who and where patients are, from the ingested Patient / Encounter resources


@app.get("/healthz", tags=["operations"])
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@app.get("/readyz", tags=["operations"])
def readyz(scope: Annotated[str, Query(pattern="^(all|api)$")] = "all") -> JSONResponse:
    """Ready: Redis reachable, rule catalog loaded, a worker heartbeat seen recently; else 503 with reasons.

    ``scope=api`` leaves out the worker check (the API pod's own readiness probe: CDS Hooks and the review
    API keep serving while workers restart)."""
    return readiness_response(workers=scope == "all")  # a 503 gets Retry-After from the middleware
