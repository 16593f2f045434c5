"""Access audit: every read or export of patient-level data, every alert transition and every ingested
write or delete is recorded as a FHIR R4 ``AuditEvent`` (validated with fhir.resources) in Redis
(``workers.state.audit``), queryable by patient and time and exported as ndjson by an admin.

How: the authentication dependencies leave the verified caller on the request
(``service.security.identity``); :class:`AuditMiddleware` matches the request against :data:`AUDITED`,
holds the response of an audited route until its AuditEvent is stored (a streamed export is audited when it
starts), then sends it. The patients come from the path, the call, the answer, or what the ingestion route
noted (:func:`note_access`). If the event cannot be stored, the caller gets 503 instead of the data (an
error answer, which serves no data, goes out as it is). A
request refused before any identity was verified (401) is not audited (the refusal is counted in the
``ehr_alerts_auth_failures_total`` metric). Audit records are data, not logs: nothing of them is logged.
"""

from __future__ import annotations

import base64
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qs

import anyio.to_thread
import orjson
import redis
from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import StreamingResponse
from fhir.resources.R4B.auditevent import AuditEvent

from service.observability.middleware import peeked_json
from service.security import Principal, require_role
from service.security.identity import Identity, identity_of
from workers.state import audit as store
from workers.state import keys
from workers.state.connection import get_redis

log = logging.getLogger("ehr_alerts.audit")

DCM = "http://dicom.nema.org/resources/ontology/DCM"
REST = "http://hl7.org/fhir/restful-interaction"
ACTION_SYSTEM = "urn:ehr-alerts:audit-action"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ROLE_TYPE = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
#: Patients named by one AuditEvent; a request touching more is recorded as several events.
MAX_PATIENTS_PER_EVENT = 1000
_NOTED = "ehr_alerts.audit_noted"
_REFUSED = "ehr_alerts.audit_refused"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_MAX_BODY = 8 * 1024 * 1024

Scope = MutableMapping[str, Any]


# --- what the routes tell the audit ---------------------------------------------------------------------------


def note_access(scope: Scope, *, patients: Iterable[str], resource: str | None = None) -> None:
    """Called by a route that knows best which patients (and resource) a request touched (ingestion)."""
    scope[_NOTED] = (sorted(set(patients)), resource)


# --- which routes are audited, and how ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What an extractor may look at."""

    scope: Scope
    match: re.Match[str]
    body: Any  # the parsed JSON answer, or None


@dataclass(frozen=True)
class Audited:
    """An audited route: the event type, the FHIR interaction and action, and where the patients come from."""

    method: str
    path: re.Pattern[str]
    kind: str  # read | search | transition | export | ingest
    interaction: str  # restful-interaction code
    action: str  # C R U D E
    patients: Callable[[Context], list[str]]
    resource: Callable[[Context], str | None] = lambda c: None
    streamed: bool = False


def _from_path(c: Context) -> list[str]:
    return [c.match.group(1)]


def _alert_patients(field: str) -> Callable[[Context], list[str]]:
    def extract(c: Context) -> list[str]:
        rows = c.body.get(field) if isinstance(c.body, dict) else None
        return [r["patient"] for r in rows or [] if isinstance(r, dict) and isinstance(r.get("patient"), str)]

    return extract


def _answer_patient(c: Context) -> list[str]:
    patient = c.body.get("patient") if isinstance(c.body, dict) else None
    return [patient] if isinstance(patient, str) else _alert_owner(c.match.group(1))


def _body_patient(c: Context) -> list[str]:
    patient = c.body.get("patient") if isinstance(c.body, dict) else None
    return [patient] if isinstance(patient, str) else []


def _alert_owner(alert_id: str | None) -> list[str]:
    if not alert_id or not _ID.match(alert_id):
        return []
    patient = get_redis().hget(keys.alert_patients(), alert_id)
    return [patient] if patient else []


def _page_alert(c: Context) -> list[str]:
    return _alert_owner(_query(c.scope).get("alert"))


def _cds_patient(c: Context) -> list[str]:
    peeked = peeked_json(c.scope, _MAX_BODY)
    data = peeked.value if peeked else None
    context = data.get("context") if isinstance(data, dict) else None
    patient = context.get("patientId") if isinstance(context, dict) else None
    return [patient] if isinstance(patient, str) and _ID.match(patient) else []


def _feedback_patients(c: Context) -> list[str]:
    items = c.body.get("feedback") if isinstance(c.body, dict) else None
    cards = [i.get("card") for i in items or [] if isinstance(i, dict) and i.get("status") == 200]
    return [p for card in cards if isinstance(card, str) for p in _alert_owner(card)]


def _noted(c: Context) -> list[str]:
    noted = c.scope.get(_NOTED)
    return list(noted[0]) if noted else []


def _noted_resource(c: Context) -> str | None:
    noted = c.scope.get(_NOTED)
    return noted[1] if noted else None


def _alert_resource(c: Context) -> str | None:
    return f"DetectedIssue/{c.match.group(1)}"


def _second_alert(c: Context) -> str | None:
    return f"DetectedIssue/{c.match.group(2)}"


def _page_resource(c: Context) -> str | None:
    alert = _query(c.scope).get("alert")
    return f"DetectedIssue/{alert}" if alert and _ID.match(alert) else None


def _audit_patient(c: Context) -> list[str]:
    patient = _query(c.scope).get("patient")
    return [patient] if patient and _ID.match(patient) else []


def _query(scope: Scope) -> dict[str, str]:
    text = scope.get("query_string", b"").decode("latin-1")
    return {k: v[0] for k, v in parse_qs(text).items()}


def _r(method: str, path: str, kind: str, interaction: str, action: str, patients: Any, **kw: Any) -> Audited:
    return Audited(method, re.compile(f"^{path}$"), kind, interaction, action, patients, **kw)


_SEG = "([^/]+)"
AUDITED: tuple[Audited, ...] = (
    _r("GET", "/alerts", "search", "search-type", "E", _alert_patients("alerts")),
    _r("GET", f"/patients/{_SEG}/alerts", "search", "search-type", "E", _from_path),
    _r("GET", f"/patients/{_SEG}/alerts/{_SEG}", "read", "read", "R", _from_path, resource=_second_alert),
    _r("GET", "/api/review/alerts", "search", "search-type", "E", _alert_patients("items")),
    _r("GET", f"/api/review/alerts/{_SEG}", "read", "read", "R", _answer_patient, resource=_alert_resource),
    _r(
        "POST",
        f"/api/review/alerts/{_SEG}/transitions",
        "transition",
        "update",
        "U",
        _answer_patient,
        resource=_alert_resource,
    ),
    _r("GET", "/api/review/patients", "search", "search-type", "E", _alert_patients("groups")),
    _r("POST", f"/api/review/patients/{_SEG}/acknowledge", "transition", "update", "U", _from_path),
    _r("GET", "/api/review/data-problems", "search", "search-type", "E", _alert_patients("items")),
    _r("POST", f"/api/review/data-problems/{_SEG}/transitions", "transition", "update", "U", _body_patient),
    _r("GET", "/review", "read", "search-type", "E", _page_alert, resource=_page_resource),
    _r("POST", f"/review/patients/{_SEG}/acknowledge", "transition", "update", "U", _from_path),
    _r("GET", "/review/data-problems", "search", "search-type", "E", lambda c: []),
    _r("POST", f"/review/data-problems/{_SEG}/{_SEG}", "transition", "update", "U", lambda c: []),
    _r("POST", f"/review/alerts/{_SEG}/{_SEG}", "transition", "update", "U", _answer_patient, resource=_alert_resource),
    _r("GET", "/api/review/audit", "export", "search-system", "E", lambda c: [], streamed=True),
    _r("POST", f"/cds-services/{_SEG}", "read", "operation", "E", _cds_patient),
    _r("POST", f"/cds-services/{_SEG}/feedback", "transition", "update", "U", _feedback_patients),
    _r("POST", "/fhir", "ingest", "batch", "C", _noted, resource=_noted_resource),
    _r("POST", r"/fhir/\$import", "ingest", "create", "C", _noted, resource=_noted_resource),
    _r("POST", f"/fhir/{_SEG}", "ingest", "create", "C", _noted, resource=_noted_resource),
    _r("PUT", f"/fhir/{_SEG}/{_SEG}", "ingest", "update", "U", _noted, resource=_noted_resource),
    _r("DELETE", f"/fhir/{_SEG}/{_SEG}", "ingest", "delete", "D", _noted, resource=_noted_resource),
    _r("GET", "/audit/AuditEvent", "export", "search-type", "E", _audit_patient, streamed=True),
)


def audited_route(method: str, path: str) -> tuple[Audited, re.Match[str]] | None:
    """The audit rule for a request, if it is audited."""
    for rule in AUDITED:
        if rule.method == method:
            match = rule.path.match(path)
            if match:
                return rule, match
    return None


# --- the AuditEvent ------------------------------------------------------------------------------------------------


def _agents(identity: Identity, address: str | None) -> list[dict[str, Any]]:
    human = identity.kind == "user" or identity.user is not None
    requestor: dict[str, Any] = {
        "type": {"coding": [{"system": ROLE_TYPE, "code": "humanuser" if human else "dataprocessor"}]},
        "who": {"identifier": {"system": identity.issuer, "value": identity.subject}},
        "requestor": True,
    }
    if identity.user:  # an EHR acting for its user (CDS Hooks context.userId)
        requestor["who"] = {"reference": identity.user} if "/" in identity.user else {"display": identity.user}
    if identity.name:
        requestor["who"]["display"] = identity.name
    if address:
        requestor["network"] = {"address": address, "type": "2"}
    agents = [requestor]
    application = identity.client or (identity.subject if identity.user else None)
    if application:
        agents.append(
            {
                "type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
                "who": {"identifier": {"system": identity.issuer, "value": application}},
                "requestor": False,
            }
        )
    return agents


def build_event(
    rule: Audited,
    identity: Identity,
    patients: list[str],
    resource: str | None,
    status: int,
    *,
    query: str = "",
    address: str | None = None,
    detail: str | None = None,
    recorded: datetime | None = None,
) -> dict[str, Any]:
    """One FHIR R4 AuditEvent (validated) for an access by ``identity`` that answered ``status``."""
    recorded = recorded or datetime.now(UTC)
    export = rule.kind == "export"
    entities: list[dict[str, Any]] = [
        {
            "what": {"reference": f"Patient/{p}"},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
        }
        for p in patients
    ]
    if resource:
        entities.append(
            {"what": {"reference": resource}, "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}}
        )
    if query:
        entities.append(
            {
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
                "query": base64.b64encode(query.encode()).decode(),
            }
        )
    subtype = [{"system": REST, "code": rule.interaction}, {"system": ACTION_SYSTEM, "code": detail or rule.kind}]
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "type": {"system": DCM, "code": "110106", "display": "Export"}
        if export
        else {"system": DCM, "code": "110110", "display": "Patient Record"},
        "subtype": subtype,
        "action": rule.action,
        "recorded": recorded.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "outcome": "0" if status < 400 else "4" if status < 500 else "8",
        "outcomeDesc": f"HTTP {status}",
        "agent": _agents(identity, address),
        "source": {
            "observer": {"display": "ehr-alerts"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}],
        },
    }
    if entities:
        event["entity"] = entities
    AuditEvent.model_validate(event)  # never store what is not a valid R4 AuditEvent
    return event


def record(
    rule: Audited, scope: Scope, identity: Identity, patients: list[str], resource: str | None, status: int
) -> None:
    """Store the event(s) of one request (several when it named more than MAX_PATIENTS_PER_EVENT patients)."""
    client = scope.get("client")
    address = client[0] if isinstance(client, list | tuple) and client else None
    query = scope.get("query_string", b"").decode("latin-1") if rule.kind in ("search", "export") else ""
    detail = None
    if rule.kind == "transition" and rule.path.pattern.startswith("^/review/"):
        detail = scope.get("path", "").rsplit("/", 1)[-1][:32]
    now = datetime.now(UTC)
    unique = sorted({p for p in patients if _ID.match(p)})
    chunks = [unique[i : i + MAX_PATIENTS_PER_EVENT] for i in range(0, len(unique), MAX_PATIENTS_PER_EVENT)] or [[]]
    for chunk in chunks:
        event = build_event(
            rule, identity, chunk, resource, status, query=query, address=address, detail=detail, recorded=now
        )
        store.record(get_redis(), event, chunk, int(now.timestamp() * 1000))


# --- the middleware -----------------------------------------------------------------------------------------------


class _Refused(Exception):
    """The answer was replaced by a 503 (the audit could not be stored): the route's own answer is dropped."""


class AuditMiddleware:
    """Audits the requests matched by :data:`AUDITED` (see module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """Pass through, holding an audited route's answer until its AuditEvent is stored."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = audited_route(scope.get("method", ""), scope.get("path", ""))
        if found is None:
            await self.app(scope, receive, send)
            return
        rule, match = found
        held: list[Any] = []
        done = False

        async def audited_send(message: Any) -> None:
            nonlocal done
            if done:
                if scope.get(_REFUSED):
                    raise _Refused
                await send(message)
                return
            if message["type"] not in ("http.response.start", "http.response.body"):
                await send(message)  # e.g. the test client's http.response.debug
                return
            held.append(message)
            start = held[0]
            if rule.streamed and message["type"] == "http.response.start":
                done = True
                await self._flush(scope, rule, match, start, [], send, held)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                done = True
                body = b"".join(m.get("body", b"") for m in held[1:])
                await self._flush(scope, rule, match, start, [body], send, held)

        try:
            await self.app(scope, receive, audited_send)
        except _Refused:
            return

    async def _flush(
        self, scope: Scope, rule: Audited, match: re.Match[str], start: Any, bodies: list[bytes], send: Any, held: list
    ) -> None:
        status = int(start["status"])
        identity = identity_of(scope)
        if identity is not None:
            try:
                await anyio.to_thread.run_sync(self._store, scope, rule, match, status, identity, bodies)
            except (redis.RedisError, ValueError) as exc:
                log.error("access audit could not be stored", extra={"error": type(exc).__name__})
                if status < 400:  # data was about to be served: withheld; an error answer goes out as it is
                    scope[_REFUSED] = True
                    await _refuse(send)
                    return
        for message in held:
            await send(message)

    @staticmethod
    def _store(
        scope: Scope, rule: Audited, match: re.Match[str], status: int, identity: Identity, bodies: list[bytes]
    ) -> None:
        body = None
        if bodies and bodies[0][:1] in (b"{", b"["):
            try:
                body = orjson.loads(bodies[0])
            except orjson.JSONDecodeError:
                body = None
        context = Context(scope, match, body)
        patients = rule.patients(context) if status < 500 else []
        if rule.kind == "read" and rule.path.pattern.startswith("^/cds-services/"):
            identity = _with_cds_user(identity, scope)
        record(rule, scope, identity, patients, rule.resource(context), status)


def _with_cds_user(identity: Identity, scope: Scope) -> Identity:
    peeked = peeked_json(scope, _MAX_BODY)
    data = peeked.value if peeked else None
    context = data.get("context") if isinstance(data, dict) else None
    user = context.get("userId") if isinstance(context, dict) else None
    if not isinstance(user, str) or not user or len(user) > 256:
        return identity
    return Identity(identity.kind, identity.issuer, identity.subject, identity.client, identity.name, user)


async def _refuse(send: Any) -> None:
    body = orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "transient", "diagnostics": "the access audit is unavailable"}],
        }
    )
    headers = [(b"content-type", b"application/fhir+json"), (b"retry-after", b"5")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- the export ---------------------------------------------------------------------------------------------------

router = APIRouter(prefix="/audit", tags=["audit"])


def _ms(text: str | None, name: str, default: int) -> int:
    from service.errors import FhirError

    if not text:
        return default
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FhirError(400, f"{name}: not an ISO date-time", name) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


@router.get(
    "/AuditEvent",
    responses={200: {"content": {"application/fhir+ndjson": {}}, "description": "AuditEvents, one per line"}},
)
def export_audit(
    _: Annotated[Principal, Depends(require_role("admin"))],
    patient: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9\-.]{1,64}$", description="only this patient")] = None,
    start: Annotated[str | None, Query(alias="from", max_length=40, description="recorded at or after (ISO)")] = None,
    end: Annotated[str | None, Query(alias="to", max_length=40, description="recorded before (ISO)")] = None,
) -> StreamingResponse:
    """Access AuditEvents (FHIR R4) recorded in [from, to), optionally only those naming ``patient``, as
    ``application/fhir+ndjson``, oldest first. Admins only; this export is audited too."""
    now = int(time.time() * 1000)
    query = store.AuditQuery(_ms(start, "from", 0), _ms(end, "to", now + 1), patient)

    def lines() -> Iterator[bytes]:
        for event in store.query(get_redis(), query):
            yield orjson.dumps(event) + b"\n"

    return StreamingResponse(lines(), media_type="application/fhir+ndjson")


def install(app: FastAPI) -> None:
    """Add the export route and the audit middleware (inside the observability middleware)."""
    app.include_router(router)
    app.add_middleware(AuditMiddleware)
