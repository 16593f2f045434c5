"""Every error of the HTTP API as a FHIR OperationOutcome: request errors (4xx), a busy lane or an unavailable
Redis / broker (503 with ``Retry-After``) and, last resort, unexpected failures (500 without details).

``install(app)`` registers the handlers; routes raise :class:`FhirError` (or ``HTTPException``).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.ingest import error_outcome
from service.offload import Busy

log = logging.getLogger("ehr_alerts.http")

FHIR_JSON = "application/fhir+json"
#: Seconds a client is told to wait when Redis (store or broker) is unavailable.
RETRY_AFTER_UNAVAILABLE = 5
#: ... when the ingestion lane is full.
RETRY_AFTER_BUSY = 2

_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "business-rule",
    413: "too-costly",
    415: "not-supported",
    422: "invalid",
    428: "business-rule",
    429: "throttled",
    503: "transient",
}


class FhirError(Exception):
    """An error answered as a FHIR OperationOutcome with ``status``; ``expression`` names the field."""

    def __init__(
        self,
        status: int,
        message: str,
        expression: str | None = None,
        code: str = "invalid",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.expression, self.code = status, message, expression, code
        self.headers = headers


def outcome_response(
    status: int, message: str, expression: str | None = None, code: str | None = None, **headers: str
) -> JSONResponse:
    """An OperationOutcome answer with one error issue."""
    body = error_outcome(message, expression, code or _CODES.get(status, "processing"))
    return JSONResponse(body, status, media_type=FHIR_JSON, headers=headers or None)


def unavailable(what: str) -> JSONResponse:
    """503 + Retry-After for a dependency that is down."""
    return outcome_response(
        503, f"{what} is unavailable; retry later", code="transient", **{"Retry-After": str(RETRY_AFTER_UNAVAILABLE)}
    )


async def _fhir_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FhirError)
    return outcome_response(exc.status, exc.message, exc.expression, exc.code, **(exc.headers or {}))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first: Any = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        message = "malformed JSON body"
    return outcome_response(400, f"{where}: {message}" if where else message, where or None)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})  # a 503 without Retry-After gets one from the observability middleware
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    return outcome_response(exc.status_code, detail, **headers)


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable", extra={"error": type(exc).__name__, "route": _route(request)})
    return unavailable("the alert store (Redis)")


async def _broker_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("broker unavailable", extra={"error": type(exc).__name__, "route": _route(request)})
    return unavailable("the task broker (Redis)")


async def _busy(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Busy)
    return outcome_response(
        503,
        f"too many {exc.lane} requests in progress; retry later",
        code="throttled",
        **{"Retry-After": str(RETRY_AFTER_BUSY)},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error", extra={"error": type(exc).__name__, "route": _route(request)})
    return outcome_response(500, "internal error (logged with the request id)", code="exception")


def _route(request: Request) -> str:
    path = getattr(request.scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(FhirError, _fhir_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(redis.RedisError, _redis_error)
    app.add_exception_handler(BrokerError, _broker_error)
    app.add_exception_handler(Busy, _busy)
    app.add_exception_handler(Exception, _unexpected)
