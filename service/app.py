"""The FastAPI application: FHIR ingestion, alert read API, health."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from config.settings import get_settings
from service.cds.router import router as cds_router
from service.ingest import (
    Enqueuer,
    EntryOutcome,
    Ingested,
    error_outcome,
    ingest_bundle_entries,
    ingest_delete,
    ingest_one,
    operation_outcome,
)
from service.observability import install as install_observability
from service.observability import readiness_response
from service.process import freeze_startup_heap
from service.review import install as install_review
from service.review.patients import install as install_patients
from service.review.patients import stored_directory
from service.security import install_cors, log_security_warnings
from service.subscriptions import parse_status, record_event_numbers
from workers.pipeline import get_store
from workers.state.statuses import STATUSES

FHIR_JSON = "application/fhir+json"
JSON_TYPES = ("application/fhir+json", "application/json")
NDJSON_TYPES = ("application/fhir+ndjson", "application/x-ndjson", "application/ndjson")
RESOURCE_TYPES = (
    "Observation",
    "MedicationStatement",
    "MedicationRequest",
    "MedicationAdministration",
    "Condition",
    "Procedure",
    "Patient",
    "Encounter",
)
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

app = FastAPI(
    title="ehr-alerts",
    version="0.1.0",
    description="FHIR R4 Mg/K alerting: event ingestion, alerts, CDS Hooks.",
)
install_cors(app)  # EHR_ALERTS_CORS_ORIGINS allow-list (browser-based CDS clients)
install_observability(app)  # JSON logs, request ids, GET /metrics (outermost middleware: sees every request)
log_security_warnings()  # auth off, dev profile, nothing trusted ... said loudly at start

app.include_router(cds_router)  # CDS Hooks: /cds-services (service/cds/)
# GC tuning once started; registered after the CDS router, so it runs after the catalog warm-up
app.router.add_event_handler("startup", freeze_startup_heap)


class FhirError(Exception):
    """An error answered as a FHIR OperationOutcome."""

    def __init__(self, status: int, message: str, expression: str | None = None, code: str = "invalid") -> None:
        super().__init__(message)
        self.status, self.message, self.expression, self.code = status, message, expression, code


@app.exception_handler(FhirError)
async def _fhir_error(_: Request, exc: FhirError) -> JSONResponse:
    return JSONResponse(error_outcome(exc.message, exc.expression, exc.code), exc.status, media_type=FHIR_JSON)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return JSONResponse(error_outcome(f"{where}: {first['msg']}", where), 400, media_type=FHIR_JSON)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_size(request: Request) -> int:
    limit = get_settings().max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise FhirError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="too-costly")
    return limit


async def _limited_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise FhirError(413, f"request body exceeds the limit of {limit} bytes", code="too-costly")
        yield chunk


async def _json_body(request: Request) -> Any:
    if _media_type(request) not in JSON_TYPES:
        raise FhirError(
            415,
            f"Content-Type must be {FHIR_JSON} or application/json, got {_media_type(request) or 'none'}",
            code="not-supported",
        )
    limit = _check_size(request)
    body = b"".join([chunk async for chunk in _limited_chunks(request, limit)])
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FhirError(400, f"malformed JSON: {exc}", code="structure") from exc


def _accepted(answer: Ingested, enqueuer: Enqueuer) -> JSONResponse:
    enqueuer.flush()
    # 202 while anything in the request could be used; 422 when every entry was rejected.
    rejected_all = bool(answer.entries) and all(e.outcome == "rejected" for e in answer.entries)
    status = 422 if rejected_all else 202
    return JSONResponse(operation_outcome(answer), status, media_type=FHIR_JSON)


@app.post("/fhir", status_code=202, tags=["ingestion"])
async def post_bundle(request: Request) -> JSONResponse:
    """A Bundle: transaction, batch, collection, or a Subscriptions notification (type history)."""
    data = await _json_body(request)
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise FhirError(400, "POST /fhir expects a Bundle", "resourceType")
    answer, enqueuer = Ingested(), Enqueuer()
    entries = data.get("entry") or []
    if data.get("type") == "history" and entries and isinstance(entries[0], dict):
        note = parse_status(entries[0].get("resource") or {})
        if note is not None:
            for message in record_event_numbers(get_store().client, note):
                answer.notes.append(("warning", "Bundle.entry[0].resource", message))
            if note.type in ("handshake", "heartbeat"):
                answer.notes.append(("information", "Bundle.entry[0].resource", f"{note.type} acknowledged"))
                return JSONResponse(operation_outcome(answer), 200, media_type=FHIR_JSON)
    ingest_bundle_entries(data, enqueuer, answer)
    return _accepted(answer, enqueuer)


async def _single(request: Request, resource_type: str, resource_id: str | None) -> JSONResponse:
    if resource_type not in RESOURCE_TYPES:
        raise FhirError(
            404,
            f"resource type {resource_type} is not accepted here (accepted: {', '.join(RESOURCE_TYPES)})",
            code="not-supported",
        )
    data = await _json_body(request)
    if not isinstance(data, dict):
        raise FhirError(400, "expected a FHIR resource (JSON object)", code="structure")
    if data.get("resourceType") != resource_type:
        raise FhirError(
            400, f"resourceType {data.get('resourceType')!r} does not match the URL ({resource_type})", "resourceType"
        )
    if resource_id is not None and data.get("id") != resource_id:
        raise FhirError(400, f"id {data.get('id')!r} does not match the URL ({resource_id})", f"{resource_type}.id")
    answer, enqueuer = Ingested(), Enqueuer()
    ingest_one(data, resource_type, enqueuer, answer)
    if answer.entries[0].outcome == "rejected":
        enqueuer.flush()
        return JSONResponse(operation_outcome(answer), 400, media_type=FHIR_JSON)
    return _accepted(answer, enqueuer)


@app.put("/fhir/{resource_type}/{resource_id}", status_code=202, tags=["ingestion"])
async def put_resource(resource_type: str, resource_id: str, request: Request) -> JSONResponse:
    """One resource version (HAPI FHIR rest-hook subscriptions send exactly this)."""
    if not _ID.match(resource_id):
        raise FhirError(400, f"invalid id {resource_id!r}", "id")
    return await _single(request, resource_type, resource_id)


@app.delete("/fhir/{resource_type}/{resource_id}", status_code=202, tags=["ingestion"])
def delete_resource(resource_type: str, resource_id: str) -> JSONResponse:
    """A delete (HAPI rest-hook subscriptions send one when a resource is deleted): the resource's facts are
    retracted, as for entered-in-error, and so are the alerts they supported."""
    answer, enqueuer = Ingested(), Enqueuer()
    ingest_delete(f"{resource_type}/{resource_id}", resource_type, enqueuer, answer)
    return _accepted(answer, enqueuer)


@app.post("/fhir/$import", status_code=202, tags=["ingestion"])
async def import_ndjson(request: Request) -> JSONResponse:
    """Bulk backfill: application/fhir+ndjson, one resource per line, streamed (never read whole)."""
    if _media_type(request) not in NDJSON_TYPES:
        raise FhirError(415, "Content-Type must be application/fhir+ndjson", code="not-supported")
    limit = _check_size(request)
    answer, enqueuer = Ingested(), Enqueuer()
    buffer = b""
    number = 0

    def handle(line: bytes) -> None:
        nonlocal number
        number += 1
        if not line.strip():
            return
        try:
            data = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            answer.entries.append(
                EntryOutcome(
                    f"line {number}", "rejected", None, [("error", f"line {number}", f"malformed JSON: {exc}")]
                )
            )
            return
        ingest_one(data, f"line {number}", enqueuer, answer)

    async for chunk in _limited_chunks(request, limit):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            handle(line)
    if buffer:
        handle(buffer)
    return _accepted(answer, enqueuer)


@app.post("/fhir/{resource_type}", status_code=202, tags=["ingestion"])
async def post_resource(resource_type: str, request: Request) -> JSONResponse:
    """One resource (create)."""
    return await _single(request, resource_type, None)


# --- alert read API ---------------------------------------------------------------------------------------


@app.get("/alerts", tags=["alerts"])
def list_alerts(
    status: Annotated[str | None, Query(pattern=f"^({'|'.join(STATUSES)})$", description="one alert status")] = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Hospital-wide alerts, most recently changed first; filter by status and rule; cursor pagination."""
    page, next_cursor = get_store().list_alerts(status=status, rule=rule, limit=limit, cursor=cursor)
    return {"alerts": page, "next_cursor": next_cursor}


@app.get("/patients/{patient_id}/alerts", tags=["alerts"])
def patient_alerts(patient_id: str, open_only: bool = True) -> dict[str, Any]:
    """A patient's alerts (open ones by default)."""
    if not _ID.match(patient_id):
        raise FhirError(400, f"invalid patient id {patient_id!r}", "patient_id")
    return {"alerts": get_store().alerts_for_patient(patient_id, open_only=open_only)}


@app.get("/patients/{patient_id}/alerts/{alert_id}", tags=["alerts"])
def get_alert(patient_id: str, alert_id: str) -> dict[str, Any]:
    """One alert with its evidence and history."""
    alert = get_store().get_alert(patient_id, alert_id) if _ID.match(patient_id) else None
    if alert is None:
        raise HTTPException(404, "no such alert")
    return alert


install_review(app)  # pharmacist review: /api/review (JSON), /review (page)
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
    return readiness_response(workers=scope == "all")
