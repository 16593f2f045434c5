"""ASGI middleware: request id, CDS Hooks hookInstance correlation, request log line and latency metrics.

- ``X-Request-ID`` is taken from the request when it is a plain id (else a new one is made) and echoed in
  the response; it is in every log line written while the request runs.
- For ``POST /cds-services/{id}`` the body is read once here (it is small JSON) to pick up
  ``hookInstance`` for the log context, then handed on unchanged; the parsed JSON is left in the ASGI scope
  (:func:`peeked_json`) so the CDS endpoint does not parse the same body a second time.
- One log line per request with the route *template* (``/patients/{patient_id}/alerts``), never the raw
  path or query string, which can hold patient ids.
- Every request is timed by method, route and status; anything under ``/cds-services`` is also timed by
  CDS service id and endpoint (discovery, service, feedback).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from service.observability import metrics
from workers.observability import context

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("ehr_alerts.http")
CDS_PREFIX = "/cds-services"
_MAX_PEEK = 1024 * 1024
_MAX_KNOWN_SERVICES = 64
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
_PEEKED = "ehr_alerts.peeked_json"
RETRY_AFTER = b"5"


@dataclass(frozen=True)
class PeekedJson:
    """A request body the middleware read and parsed: its size in bytes and the parsed JSON value."""

    size: int
    value: Any


def peeked_json(scope: Mapping[str, Any], limit: int) -> PeekedJson | None:
    """The body parsed by the middleware when it was complete, valid JSON and at most ``limit`` bytes; else
    None (the endpoint then reads the replayed body itself and answers the error)."""
    peeked = scope.get(_PEEKED)
    return peeked if isinstance(peeked, PeekedJson) and peeked.size <= limit else None


class ObservabilityMiddleware:
    """Wraps the whole app (see module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.known_services: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request; other ASGI scopes pass through."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        path: str = scope.get("path", "")
        hook_instance = None
        if scope.get("method") == "POST" and _cds_parts(path)[1] == "service":
            receive, hook_instance = await _peek_hook_instance(scope, receive)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
                if status == 503 and not any(name.lower() == b"retry-after" for name, _ in message["headers"]):
                    message["headers"].append((b"retry-after", RETRY_AFTER))  # every 503 says when to retry
            await send(message)

        tokens = context.bind(request_id=request_id, hook_instance=hook_instance)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope.get("method", "")
            metrics.HTTP_DURATION.labels(method, route, str(status)).observe(elapsed)
            if path == CDS_PREFIX or path.startswith(CDS_PREFIX + "/"):
                service, endpoint = _cds_parts(path)
                metrics.CDS_DURATION.labels(self._service_label(service, status), endpoint, str(status)).observe(
                    elapsed
                )
            level = _level(route, status)
            log.log(
                level,
                "%s %s %s",
                method,
                route,
                status,
                extra={"method": method, "route": route, "status": status, "duration_ms": round(elapsed * 1000, 2)},
            )
            context.reset(tokens)

    def _service_label(self, service: str | None, status: int) -> str:
        """The service id once it has answered 2xx (a bounded set); ``unknown`` before that."""
        if service is None:
            return "discovery"
        label = metrics.safe_label(service)
        if label in self.known_services:
            return label
        if 200 <= status < 300 and label != "unknown" and len(self.known_services) < _MAX_KNOWN_SERVICES:
            self.known_services.add(label)
            return label
        return "unknown"


def _level(route: str, status: int) -> int:
    """Server errors are errors; a not-ready probe a warning; successful probes and scrapes debug (noise)."""
    if status == 503:
        return logging.WARNING
    if status >= 500:
        return logging.ERROR
    if route in _QUIET_ROUTES and status < 400:
        return logging.DEBUG
    return logging.INFO


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers") or []:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if context.SAFE_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _cds_parts(path: str) -> tuple[str | None, str]:
    """(service id, endpoint) of a CDS Hooks path: discovery, service or feedback; ("", "other") otherwise."""
    if path.rstrip("/") == CDS_PREFIX:
        return None, "discovery"
    if not path.startswith(CDS_PREFIX + "/"):
        return "", "other"
    parts = path[len(CDS_PREFIX) + 1 :].strip("/").split("/")
    if len(parts) == 1:
        return parts[0], "service"
    if len(parts) == 2 and parts[1] == "feedback":
        return parts[0], "feedback"
    return parts[0], "other"


async def _peek_hook_instance(scope: Scope, receive: Receive) -> tuple[Receive, str | None]:
    """Read the request body, return a receive that replays it, and the body's ``hookInstance`` if safe; the
    parsed body is left in ``scope`` for the endpoint (:func:`peeked_json`)."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        if not message.get("more_body") or size > _MAX_PEEK:
            break
    hook_instance = None
    complete = messages[-1]["type"] == "http.request" and not messages[-1].get("more_body")
    if complete and size <= _MAX_PEEK:
        try:
            data = orjson.loads(b"".join(m.get("body", b"") for m in messages))
        except orjson.JSONDecodeError:
            pass
        else:
            scope[_PEEKED] = PeekedJson(size, data)
            candidate = data.get("hookInstance") if isinstance(data, dict) else None
            if isinstance(candidate, str) and context.SAFE_ID.match(candidate):
                hook_instance = candidate

    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    return replay, hook_instance
