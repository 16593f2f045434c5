"""HTTP endpoints of the CDS Hooks service (CDS Hooks 2.0.1): discovery, service calls, feedback."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from config.settings import get_settings
from rules.catalog import Catalog
from rules.engine import evaluate
from service.cds.auth import CdsClient, cds_client
from service.cds.cardindex import CardIndex
from service.cds.cards import build_cards
from service.cds.coverage import Coverage, coverage, report
from service.cds.errors import CdsError, CdsRoute, code_for, issue
from service.cds.feedback import apply_item, parse_feedback
from service.cds.fhir_client import fetch_missing, plan
from service.cds.fhir_servers import fhir_server_refusal
from service.cds.orders import NormalizeCache, draft_order_facts, facts_from
from service.cds.prefetch import read_prefetch
from service.cds.request import HookRequest, parse_request
from service.cds.services import CdsService, services
from service.errors import RETRY_AFTER_BUSY
from service.observability.middleware import peeked_json
from service.offload import Busy, get_lane
from workers.pipeline import get_catalog, get_store

log = logging.getLogger("ehr_alerts.cds")
router = APIRouter(prefix="/cds-services", tags=["cds-hooks"], route_class=CdsRoute)
Client = Annotated[CdsClient, Depends(cds_client)]
_JSON_TYPES = ("application/json", "application/fhir+json")


def _warm() -> None:
    """Load (and self-test) the rule catalog at start, not on the first CDS call (which would take seconds)."""
    _services(get_catalog())


router.add_event_handler("startup", _warm)
_SERVICES: dict[int, dict[str, CdsService]] = {}
_CACHE: list[NormalizeCache] = []


def _normalize_cache() -> NormalizeCache:
    """One normalisation cache per process."""
    if not _CACHE:
        _CACHE.append(NormalizeCache(get_settings().cds_normalize_cache_size))
    return _CACHE[0]


def _services(catalog: Catalog) -> dict[str, CdsService]:
    """The services of the loaded catalog (built once per catalog object)."""
    found = _SERVICES.get(id(catalog))
    if found is None:
        found = _SERVICES[id(catalog)] = {s.id: s for s in services(catalog)}
    return found


def _service(service_id: str) -> CdsService:
    found = _services(get_catalog()).get(service_id)
    if found is None:
        raise CdsError(404, f"no CDS service {service_id[:64]!r}; see GET /cds-services", "id", "not-found")
    return found


async def _json_body(request: Request) -> Any:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in _JSON_TYPES:
        raise CdsError(415, f"Content-Type must be application/json, got {media or 'none'}", code="not-supported")
    limit = get_settings().max_body_bytes
    parsed = peeked_json(request.scope, limit)
    if parsed is not None:  # the observability middleware already read and parsed this body (once per call)
        return parsed.value
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise CdsError(413, f"request body exceeds the limit of {limit} bytes", code="too-costly")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise CdsError(400, "the body is not valid JSON", code="structure") from None


def _cards_for(
    call: HookRequest, resources: list[dict[str, Any]], now: datetime, found: Coverage
) -> list[dict[str, Any]]:
    """Facts from the call's data and draft orders -> the rule engine -> cards merged with stored alerts.
    Rules the call could not check for lack of data show only their stored alert's card, with a note."""
    settings = get_settings()
    cache = _normalize_cache()
    facts = facts_from(resources, call.patient_id, settings.include_preliminary, cache)
    facts += draft_order_facts(call.draft_orders, call.patient_id, cache)
    decisions = evaluate(get_catalog().evaluated(), facts, now, call.patient_id)
    store = get_store()
    stored = store.alerts_for_patient(call.patient_id, open_only=True)
    index = CardIndex(store.client, settings)
    origin = {"hook": call.hook, "user": call.user_id}
    return build_cards(decisions, stored, call.patient_id, index, now, store, unchecked=found.notes(), origin=origin)


def _apply_feedback(items: list[Any], actor: str) -> list[Any]:
    """Every feedback item applied to the alert store (on a cds lane thread: synchronous store calls)."""
    store = get_store()
    index = CardIndex(store.client, get_settings())
    catalog = get_catalog()
    return [apply_item(item, store, index, catalog, actor) for item in items]


def _busy() -> Response:
    """503 throttled + Retry-After: the cds lane already holds ``EHR_ALERTS_CDS_MAX_REQUESTS`` requests."""
    error = CdsError(503, "too many CDS Hooks requests in progress; retry later", code="throttled")
    response = error.response()
    response.headers["Retry-After"] = str(RETRY_AFTER_BUSY)
    return response


@router.get("", summary="CDS Hooks discovery")
async def discovery(_: Client) -> dict[str, Any]:
    """The services offered, one per hook, with 2.0 prefetch templates."""
    page_size = get_settings().cds_fhir_page_size
    return {"services": [s.discovery(page_size) for s in _services(get_catalog()).values()]}


@router.post("/{service_id}", summary="Call a CDS service")
async def call_service(service_id: str, request: Request, client: Client) -> Response:
    """Cards for one hook call: prefetch (or FHIR server) -> facts -> rule engine, merged with stored alerts."""
    try:
        service = _service(service_id)
        call = parse_request(await _json_body(request), service.hook)
        settings = get_settings()
        refusal = fhir_server_refusal(client.issuer, call.fhir_server, settings)
        if refusal:  # before anything is fetched: a refused server is never contacted
            raise CdsError(412, refusal, "fhirServer", "forbidden")
        now = datetime.now(UTC)
        lane = get_lane("cds")
        async with lane.admit():
            data = read_prefetch(service.prefetch, call.prefetch)
            fetches, gaps = plan(call, settings, service.prefetch, data, now)
            fetched, failed = await fetch_missing(call, settings, fetches)
            found = coverage({**gaps, **failed}, get_catalog().rules, service.prefetch)
            report(found, service.prefetch, service.id)
            resources = [r for key, item in data.items() for r in fetched.get(key, item.resources)]
            # On a cds lane thread: normalisation and the rule engine are CPU work, and the alert store and card
            # index are read and written with the synchronous client of workers.state; the event loop stays free
            # for other calls, and a burst of ingestion requests (the ingest lane) cannot take these threads.
            cards = await lane.run(_cards_for, call, resources, now, found)
    except CdsError as exc:
        return exc.response()
    except Busy:
        return _busy()
    except redis.RedisError as exc:
        log.error("alert store unavailable for a CDS call", extra={"error": type(exc).__name__})
        return CdsError(503, "the alert store is unavailable", code="transient").response()
    if found.refuses(cards):
        return JSONResponse(found.outcome(), 412)
    log.info("cds call answered", extra={"service": service.id, "cards": len(cards), "fetched_keys": len(fetched)})
    return Response(orjson.dumps({"cards": cards}), media_type="application/json")


@router.post("/{service_id}/feedback", summary="Feedback on cards")
async def feedback(service_id: str, request: Request, client: Client) -> JSONResponse:
    """Accepted / overridden outcomes per card uuid. 200 when every item applied; when none did, the status
    of the first failure (404 unknown card); a mix answers 207 with the status of each item."""
    try:
        _service(service_id)  # an unknown service is a 404 before anything is read or applied
        items = parse_feedback(await _json_body(request))
        lane = get_lane("cds")
        async with lane.admit():
            results = await lane.run(_apply_feedback, items, client.actor)
    except CdsError as exc:
        return exc.response()
    except Busy:
        return _busy()
    except redis.RedisError as exc:
        log.error("alert store unavailable for CDS feedback", extra={"error": type(exc).__name__})
        return CdsError(503, "the alert store is unavailable", code="transient").response()
    failed = [r for r in results if r.status != 200]
    if failed and len(failed) == len(results):
        issues = [
            issue(f"feedback[{r.index}]: {r.message}", f"feedback[{r.index}].card", code_for(r.status)) for r in failed
        ]
        return JSONResponse({"resourceType": "OperationOutcome", "issue": issues}, failed[0].status)
    body = {
        "feedback": [
            {
                "card": r.card,
                "status": r.status,
                **({"alertStatus": r.alert_status} if r.alert_status else {}),
                **({"message": r.message} if r.message else {}),
            }
            for r in results
        ]
    }
    return JSONResponse(body, 207 if failed else 200)
