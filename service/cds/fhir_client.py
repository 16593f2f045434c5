"""Fetching what the prefetch did not hold from the EHR's FHIR server (async, one hard deadline per call).

Each prefetch key is fetched on its own: a key that cannot be had (no usable ``fhirServer``, an HTTP error, a
refused search, the deadline) becomes a :class:`Gap` and the others are still used (see
:mod:`service.cds.coverage` for what a gap does to the cards and when it means 412).

The access token goes only to URLs under ``fhirServer`` (a next link elsewhere is not followed), and it is
never logged: gaps name the key, the HTTP status and the kind of failure only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from config.settings import Settings
from service.cds.prefetch import KeyData, collect_bundle
from service.cds.request import HookRequest
from service.cds.services import PrefetchQuery

FHIR_ACCEPT = "application/fhir+json, application/json;q=0.9"
#: Kinds of gap (a metric label) and the OperationOutcome issue code of a 412 caused by one.
GAP_CODES = {
    "no-fhir-server": "required",
    "not-https": "not-supported",
    "http-error": "incomplete",
    "refused": "incomplete",
    "unreachable": "incomplete",
    "invalid-response": "incomplete",
    "outcome-error": "incomplete",
    "outside-link": "incomplete",
    "too-many-pages": "too-costly",
    "timeout": "timeout",
}


class FhirUnavailable(Exception):
    """Data of one prefetch key cannot be had from the FHIR server."""

    def __init__(self, key: str, reason: str, kind: str) -> None:
        super().__init__(f"prefetch key {key!r}: {reason}")
        self.key, self.reason, self.kind = key, reason, kind


@dataclass(frozen=True)
class Gap:
    """A prefetch key the call could not (fully) have. ``partial``: the first page(s) were had and are used."""

    key: str
    reason: str  # in words, without values (cards, logs, OperationOutcome diagnostics)
    kind: str  # one of GAP_CODES
    partial: bool = False

    def issue_code(self) -> str:
        """The OperationOutcome issue code of a 412 this gap caused."""
        return GAP_CODES.get(self.kind, "incomplete")


@dataclass
class _Fetch:
    key: str
    url: str
    params: list[tuple[str, str]] | None
    resources: list[dict[str, Any]]
    partial: bool  # the prefetch gave the first page(s)


def _under(base: str, url: str) -> bool:
    return url == base or url.startswith(base + "/") or url.startswith(base + "?")


def check_server(request: HookRequest, settings: Settings, key: str) -> str:
    """The FHIR base URL to query, or FhirUnavailable when there is none we may use."""
    base = request.fhir_server
    if base is None:
        raise FhirUnavailable(key, "the request has no fhirServer to search", "no-fhir-server")
    if settings.cds_fhir_require_https and urlsplit(base).scheme != "https":
        raise FhirUnavailable(key, "fhirServer is not https (EHR_ALERTS_CDS_FHIR_REQUIRE_HTTPS)", "not-https")
    return base


def _http_failure(key: str, status: int) -> FhirUnavailable:
    if status in (401, 403):
        return FhirUnavailable(key, f"the FHIR server refused the search (HTTP {status})", "refused")
    return FhirUnavailable(key, f"the FHIR server answered HTTP {status}", "http-error")


async def _get_pages(client: httpx.AsyncClient, base: str, fetch: _Fetch, max_pages: int) -> list[dict[str, Any]]:
    url, params = fetch.url, fetch.params
    resources = list(fetch.resources)
    for _ in range(max_pages):
        if not _under(base, url):
            raise FhirUnavailable(fetch.key, "a next link points outside fhirServer", "outside-link")
        try:
            response = await client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise FhirUnavailable(
                fetch.key, f"the FHIR server is unreachable ({type(exc).__name__})", "unreachable"
            ) from None
        if response.status_code != 200:
            raise _http_failure(fetch.key, response.status_code)
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FhirUnavailable(
                fetch.key, "the FHIR server answered something that is not JSON", "invalid-response"
            ) from None
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise FhirUnavailable(fetch.key, "the FHIR server did not answer a Bundle", "invalid-response")
        reason = collect_bundle(body, resources)
        if reason:
            raise FhirUnavailable(fetch.key, f"the FHIR server: {reason}", "outcome-error")
        url, params = _next(body), None
        if url is None:
            return resources
    raise FhirUnavailable(fetch.key, f"more than {max_pages} pages (EHR_ALERTS_CDS_FHIR_MAX_PAGES)", "too-many-pages")


def _next(bundle: dict[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None


def plan(
    request: HookRequest,
    settings: Settings,
    queries: Iterable[PrefetchQuery],
    data: dict[str, KeyData],
    as_of: datetime,
) -> tuple[list[_Fetch], dict[str, Gap]]:
    """What to fetch (continue a paginated prefetch under fhirServer, else run the key's own search), and the
    keys that cannot be fetched at all because there is no usable fhirServer. A paginated key whose next page
    cannot be had keeps its first page (a partial gap: §17 item 33, follow the link or still answer 200)."""
    fetches: list[_Fetch] = []
    gaps: dict[str, Gap] = {}
    for query in queries:
        item = data[query.key]
        if item.state == "complete":
            continue
        partial = item.state == "continued"
        try:
            base = check_server(request, settings, query.key)
        except FhirUnavailable as exc:
            gaps[query.key] = Gap(query.key, f"{item.reason}, and {exc.reason}", exc.kind, partial)
            continue
        if partial and item.next_url and _under(base, item.next_url):
            fetches.append(_Fetch(query.key, item.next_url, None, item.resources, True))
            continue
        resource_type, params = query.own_search(request.tokens(), as_of, settings.cds_fhir_page_size)
        fetches.append(_Fetch(query.key, f"{base}/{resource_type}", params, [], False))
    return fetches, gaps


async def fetch_missing(
    request: HookRequest, settings: Settings, fetches: list[_Fetch]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Gap]]:
    """Run the fetches concurrently under one deadline: the resources of every key that could be had, and a
    gap for each key that could not (failure or deadline); one key's failure never stops the others."""
    if not fetches:
        return {}, {}
    base = request.fhir_server or ""
    headers = {"Accept": FHIR_ACCEPT}
    if request.access_token:
        headers["Authorization"] = f"Bearer {request.access_token}"
    deadline = settings.cds_fhir_timeout_seconds
    fetched: dict[str, list[dict[str, Any]]] = {}
    gaps: dict[str, Gap] = {}
    async with httpx.AsyncClient(headers=headers, timeout=deadline, follow_redirects=False) as client:
        tasks = {asyncio.ensure_future(_get_pages(client, base, f, settings.cds_fhir_max_pages)): f for f in fetches}
        _, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for task, fetch in tasks.items():
        if task in pending:
            reason = f"the FHIR server did not answer within {deadline:g} s (EHR_ALERTS_CDS_FHIR_TIMEOUT_SECONDS)"
            gaps[fetch.key] = Gap(fetch.key, reason, "timeout", fetch.partial)
        elif isinstance(task.exception(), FhirUnavailable):
            exc = task.exception()
            assert isinstance(exc, FhirUnavailable)
            gaps[fetch.key] = Gap(fetch.key, exc.reason, exc.kind, fetch.partial)
        else:
            fetched[fetch.key] = task.result()  # re-raises anything unexpected (a bug: a 500, not a gap)
    return fetched, gaps
