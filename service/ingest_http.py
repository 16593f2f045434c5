"""The FHIR ingestion routes: authenticate the feed client, apply the edge limits, then parse, validate and
enqueue on the ingest lane (``service.offload``), off the event loop.

Order for every request: token (401) -> Content-Type (415) -> a place in the lane (503) -> body within the
size limit (413) -> depth / number length (400) -> entries per Bundle (413) -> scopes of every entry (403)
-> ingestion (``service.ingest``). Everything refused before ingestion stores nothing; an $import body is
read whole (within the limit) before its first line is used, so a body refused at the limit stores nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.audit import note_access
from service.errors import FHIR_JSON, FhirError
from service.ingest import (
    RESOURCE_TYPES,
    Enqueuer,
    EntryOutcome,
    Ingested,
    ingest_bundle_entries,
    ingest_delete,
    ingest_one,
    operation_outcome,
)
from service.limits import (
    Limits,
    check_entries,
    line_problem,
    media_type,
    ndjson_lines,
    parse_bundle,
    parse_json,
    read_body,
)
from service.offload import get_lane
from service.security.feed import FeedClient, feed_writer, forbidden, missing_scope
from service.subscriptions import parse_status, record_event_numbers
from workers.pipeline import get_store

JSON_TYPES = ("application/fhir+json", "application/json")
NDJSON_TYPES = ("application/fhir+ndjson", "application/x-ndjson", "application/ndjson")
ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # a FHIR id
_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
#: entries of a subscription notification that carry no clinical data (no scope needed)
_NOTIFICATION_TYPES = frozenset({"Parameters", "SubscriptionStatus", "OperationOutcome"})
_ACTIONS = {"POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}
_MAX_LISTED = 20

Writer = Annotated[FeedClient, Depends(feed_writer)]
router = APIRouter(prefix="/fhir", tags=["ingestion"])

_RESOURCE_BODY = {"$ref": "#/components/schemas/FhirResource"}


def _body_doc(media: tuple[str, ...], schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI requestBody for a route that reads its body itself."""
    return {"requestBody": {"required": True, "content": {m: {"schema": schema} for m in media}}}


# --- the work done on the lane thread -----------------------------------------------------------------------


def _accepted(answer: Ingested, enqueuer: Enqueuer, scope: MutableMapping[str, Any], resource: str | None) -> Any:
    enqueuer.flush()
    note_access(scope, patients=getattr(enqueuer, "patients", ()), resource=resource)
    # 202 while anything in the request could be used; 422 when every entry was rejected.
    rejected_all = bool(answer.entries) and all(e.outcome == "rejected" for e in answer.entries)
    return JSONResponse(operation_outcome(answer), 422 if rejected_all else 202, media_type=FHIR_JSON)


def _needed_scopes(client: FeedClient, bundle: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    """Append ``location: scope`` for every entry whose write the token does not allow."""
    entries = bundle.get("entry")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, Mapping):
            continue
        location = f"{prefix}.entry[{i}]"
        request = entry.get("request") if isinstance(entry.get("request"), Mapping) else {}
        method = str(request.get("method", "")).upper()
        resource = entry.get("resource")
        if resource is None and method == "DELETE":
            rtype: Any = str(request.get("url") or "").lstrip("/").split("/")[0].split("?")[0]
            actions = "d"
        elif isinstance(resource, Mapping):
            rtype = resource.get("resourceType")
            if not isinstance(rtype, str):
                continue  # rejected by the ingestion with the reason
            if rtype == "Bundle":
                _needed_scopes(client, resource, f"{location}.resource", out)
                continue
            if rtype in _NOTIFICATION_TYPES:
                continue
            actions = _ACTIONS.get(method, "cu")  # no request (collection, batch without method): create or update
        else:
            continue
        if isinstance(rtype, str) and _TYPE.match(rtype):
            missing = missing_scope(client, rtype, actions)
            if missing:
                out.append(f"{location}: {missing}")


def _authorise_bundle(client: FeedClient, bundle: Mapping[str, Any]) -> None:
    refused: list[str] = []
    _needed_scopes(client, bundle, "Bundle", refused)
    if refused:
        listed = "; ".join(refused[:_MAX_LISTED]) + (f"; ... ({len(refused)} entries)" if len(refused) > 1 else "")
        raise forbidden(f"the token lacks the scope for: {listed}; nothing was stored")


def _bundle_work(body: bytes, client: FeedClient, scope: MutableMapping[str, Any]) -> Any:
    limits = Limits.from_settings()
    data = parse_bundle(body, limits)
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise FhirError(400, "POST /fhir expects a Bundle", "resourceType")
    check_entries(data, limits)
    _authorise_bundle(client, data)
    answer, enqueuer = Ingested(), Enqueuer()
    entries = data.get("entry")
    if data.get("type") == "history" and isinstance(entries, list) and entries and isinstance(entries[0], Mapping):
        status = entries[0].get("resource")
        note = parse_status(status) if isinstance(status, Mapping) else None
        if note is not None:
            for severity, message in note.problems:
                answer.notes.append((severity, "Bundle.entry[0].resource", message))
            for message in record_event_numbers(get_store().client, note):
                answer.notes.append(("warning", "Bundle.entry[0].resource", message))
            if note.type in ("handshake", "heartbeat"):
                answer.notes.append(("information", "Bundle.entry[0].resource", f"{note.type} acknowledged"))
                if len(entries) == 1:
                    note_access(scope, patients=())
                    return JSONResponse(operation_outcome(answer), 200, media_type=FHIR_JSON)
                message = f"a {note.type} carried {len(entries) - 1} more entries: they are processed as events"
                answer.notes.append(("warning", "Bundle.entry", message))
    ingest_bundle_entries(data, enqueuer, answer)
    return _accepted(answer, enqueuer, scope, None)


def _single_work(
    body: bytes, client: FeedClient, scope: MutableMapping[str, Any], resource_type: str, resource_id: str | None
) -> Any:
    data = parse_json(body, Limits.from_settings())
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
    reference = f"{resource_type}/{data.get('id')}" if isinstance(data.get("id"), str) else None
    if answer.entries[0].outcome == "rejected":
        enqueuer.flush()
        note_access(scope, patients=(), resource=reference)
        return JSONResponse(operation_outcome(answer), 400, media_type=FHIR_JSON)
    return _accepted(answer, enqueuer, scope, reference)


def _import_work(body: bytes, client: FeedClient, scope: MutableMapping[str, Any]) -> Any:
    limits = Limits.from_settings()
    answer, enqueuer = Ingested(), Enqueuer()
    for number, line in ndjson_lines(body):
        location = f"line {number}"
        problem = line_problem(line, limits)
        if problem is None:
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                problem = f"malformed JSON: {exc}"
        if problem is None and isinstance(data, Mapping) and isinstance(data.get("resourceType"), str):
            missing = missing_scope(client, data["resourceType"], "cu")
            if missing:
                problem = f"the token lacks the scope {missing}"
        if problem is not None:
            answer.entries.append(EntryOutcome(location, "rejected", None, [("error", location, problem)]))
            continue
        ingest_one(data, location, enqueuer, answer)
    return _accepted(answer, enqueuer, scope, None)


def _delete_work(client: FeedClient, scope: MutableMapping[str, Any], resource_type: str, resource_id: str) -> Any:
    answer, enqueuer = Ingested(), Enqueuer()
    reference = f"{resource_type}/{resource_id}"
    ingest_delete(reference, resource_type, enqueuer, answer)
    return _accepted(answer, enqueuer, scope, reference)


# --- routes ---------------------------------------------------------------------------------------------------


def _require_media(request: Request, allowed: tuple[str, ...], name: str) -> None:
    media = media_type(request)
    if media not in allowed:
        raise FhirError(415, f"Content-Type must be {name}, got {media or 'none'}", code="not-supported")


async def _on_lane(request: Request, allowed: tuple[str, ...], name: str, work: Any, *args: Any) -> Any:
    _require_media(request, allowed, name)
    lane = get_lane("ingest")
    async with lane.admit():
        body = await read_body(request, Limits.from_settings().body_bytes)
        return await lane.run(work, body, *args)


def _check_type(client: FeedClient, resource_type: str, actions: str) -> None:
    if resource_type not in RESOURCE_TYPES:
        raise FhirError(
            404,
            f"resource type {resource_type[:64]} is not accepted here (accepted: {', '.join(RESOURCE_TYPES)})",
            code="not-supported",
        )
    missing = missing_scope(client, resource_type, actions)
    if missing:
        raise forbidden(f"the token lacks the scope {missing}")


def _check_id(resource_id: str) -> None:
    if not ID_PATTERN.match(resource_id):
        raise FhirError(400, f"invalid id {resource_id[:80]!r}: 1-64 of A-Z a-z 0-9 - .", "id")


@router.post(
    "",
    status_code=202,
    openapi_extra=_body_doc(JSON_TYPES, {"$ref": "#/components/schemas/FhirBundle"}),
)
async def post_bundle(request: Request, client: Writer) -> Any:
    """A Bundle: transaction, batch, collection, or a Subscriptions notification (type history). Every entry
    needs the scope of its resource type and action (POST c, PUT u, DELETE d; no request: c or u)."""
    return await _on_lane(request, JSON_TYPES, "application/fhir+json", _bundle_work, client, request.scope)


@router.put("/{resource_type}/{resource_id}", status_code=202, openapi_extra=_body_doc(JSON_TYPES, _RESOURCE_BODY))
async def put_resource(resource_type: str, resource_id: str, request: Request, client: Writer) -> Any:
    """One resource version (HAPI FHIR rest-hook subscriptions send exactly this); scope ``system/<type>.u``."""
    _check_id(resource_id)
    _check_type(client, resource_type, "u")
    return await _on_lane(
        request, JSON_TYPES, "application/fhir+json", _single_work, client, request.scope, resource_type, resource_id
    )


@router.delete("/{resource_type}/{resource_id}", status_code=202)
async def delete_resource(resource_type: str, resource_id: str, request: Request, client: Writer) -> Any:
    """A delete (HAPI rest-hook subscriptions send one when a resource is deleted): the resource's facts are
    retracted, as for entered-in-error, and so are the alerts they supported; scope ``system/<type>.d``."""
    _check_id(resource_id)
    if resource_type not in RESOURCE_TYPES:
        resource_type = resource_type[:64]  # reported as not applied by ingest_delete
    elif missing := missing_scope(client, resource_type, "d"):
        raise forbidden(f"the token lacks the scope {missing}")
    lane = get_lane("ingest")
    async with lane.admit():
        return await lane.run(_delete_work, client, request.scope, resource_type, resource_id)


@router.post(
    "/$import",
    status_code=202,
    openapi_extra=_body_doc(NDJSON_TYPES, {"type": "array", "items": _RESOURCE_BODY, "description": "one per line"}),
)
async def import_ndjson(request: Request, client: Writer) -> Any:
    """Bulk backfill: application/fhir+ndjson, one resource per line; each line needs ``system/<type>.c`` or
    ``.u``. The body is received whole (within the size limit) before any line is used."""
    return await _on_lane(request, NDJSON_TYPES, "application/fhir+ndjson", _import_work, client, request.scope)


@router.post("/{resource_type}", status_code=202, openapi_extra=_body_doc(JSON_TYPES, _RESOURCE_BODY))
async def post_resource(resource_type: str, request: Request, client: Writer) -> Any:
    """One resource (create); scope ``system/<type>.c``."""
    _check_type(client, resource_type, "c")
    return await _on_lane(
        request, JSON_TYPES, "application/fhir+json", _single_work, client, request.scope, resource_type, None
    )
