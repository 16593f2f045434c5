"""Fetching what the prefetch did not hold from the EHR's FHIR server (async, one hard deadline per call).

The access token goes only to URLs under ``fhirServer`` (a next link elsewhere is not followed), and it is
never logged: errors name the key and the HTTP status only.
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


class FhirUnavailable(Exception):
    """Data a call needs cannot be had from the FHIR server; the call answers 412."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"prefetch key {key!r}: {reason}")
        self.key, self.reason = key, reason


@dataclass
class _Fetch:
    key: str
    url: str
    params: list[tuple[str, str]] | None
    resources: list[dict[str, Any]]


def _under(base: str, url: str) -> bool:
    return url == base or url.startswith(base + "/") or url.startswith(base + "?")


def check_server(request: HookRequest, settings: Settings, key: str) -> str:
    """The FHIR base URL to query, or FhirUnavailable when there is none we may use."""
    base = request.fhir_server
    if base is None:
        raise FhirUnavailable(key, "not in the prefetch and the request has no fhirServer")
    if settings.cds_fhir_require_https and urlsplit(base).scheme != "https":
        raise FhirUnavailable(key, "not in the prefetch and fhirServer is not https")
    return base


async def _get_pages(client: httpx.AsyncClient, base: str, fetch: _Fetch, max_pages: int) -> list[dict[str, Any]]:
    url, params = fetch.url, fetch.params
    resources = list(fetch.resources)
    for _ in range(max_pages):
        if not _under(base, url):
            raise FhirUnavailable(fetch.key, "a next link points outside fhirServer")
        try:
            response = await client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise FhirUnavailable(fetch.key, f"FHIR server unreachable ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise FhirUnavailable(fetch.key, f"FHIR server answered HTTP {response.status_code}")
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FhirUnavailable(fetch.key, "FHIR server answered something that is not JSON") from None
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise FhirUnavailable(fetch.key, "FHIR server did not answer a Bundle")
        reason = collect_bundle(body, resources)
        if reason:
            raise FhirUnavailable(fetch.key, f"FHIR server: {reason}")
        url, params = _next(body), None
        if url is None:
            return resources
    raise FhirUnavailable(fetch.key, f"more than {max_pages} pages")


def _next(bundle: dict[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None


def unreadable_pages(request: HookRequest, settings: Settings, data: dict[str, KeyData]) -> list[str]:
    """Prefetch keys whose Bundle has a next page that cannot be had because there is no usable ``fhirServer``
    (with one, :func:`plan` follows the link or runs the key's own search). The call then uses the first
    page and says nothing new from its own data (§17 item 33: follow the link or still answer 200)."""
    unreadable = []
    for key, item in data.items():
        if item.state != "continued":
            continue
        try:
            check_server(request, settings, key)
        except FhirUnavailable:
            unreadable.append(key)
    return unreadable


def plan(
    request: HookRequest,
    settings: Settings,
    queries: Iterable[PrefetchQuery],
    data: dict[str, KeyData],
    as_of: datetime,
    partial: Iterable[str] = (),
) -> list[_Fetch]:
    """What to fetch: continue paginated prefetch under fhirServer, else run the key's own search. Keys in
    ``partial`` (see :func:`unreadable_pages`) are used as they are."""
    partial = set(partial)
    fetches: list[_Fetch] = []
    for query in queries:
        item = data[query.key]
        if item.state == "complete" or query.key in partial:
            continue
        base = check_server(request, settings, query.key)
        if item.state == "continued" and item.next_url and _under(base, item.next_url):
            fetches.append(_Fetch(query.key, item.next_url, None, item.resources))
            continue
        resource_type, params = query.own_search(request.tokens(), as_of, settings.cds_fhir_page_size)
        fetches.append(_Fetch(query.key, f"{base}/{resource_type}", params, []))
    return fetches


async def fetch_missing(
    request: HookRequest, settings: Settings, fetches: list[_Fetch]
) -> dict[str, list[dict[str, Any]]]:
    """Run the fetches concurrently under one deadline; FhirUnavailable on any failure or on the deadline."""
    if not fetches:
        return {}
    base = request.fhir_server or ""
    headers = {"Accept": FHIR_ACCEPT}
    if request.access_token:
        headers["Authorization"] = f"Bearer {request.access_token}"
    deadline = settings.cds_fhir_timeout_seconds
    async with httpx.AsyncClient(headers=headers, timeout=deadline, follow_redirects=False) as client:
        try:
            async with asyncio.timeout(deadline):
                pages = await asyncio.gather(
                    *(_get_pages(client, base, f, settings.cds_fhir_max_pages) for f in fetches)
                )
        except TimeoutError:
            raise FhirUnavailable(fetches[0].key, f"FHIR server did not answer within {deadline:g} s") from None
    return {f.key: resources for f, resources in zip(fetches, pages, strict=True)}
