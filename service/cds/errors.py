"""Errors answered as FHIR OperationOutcome bodies (the 3.0 ballot's convention, harmless for 2.0 clients).

Every error answer of the CDS routes is an OperationOutcome whose issue code says what went wrong (FHIR R4
IssueType): the route class :class:`CdsRoute` also turns the errors FastAPI and the security dependency
raise (401, 503, request validation) into one, with the code of :data:`STATUS_CODES`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

#: The issue code of an error raised as a bare HTTP status (FHIR R4 IssueType).
STATUS_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    409: "conflict",
    412: "incomplete",
    413: "too-costly",
    415: "not-supported",
    422: "invalid",
    429: "throttled",
    503: "transient",
}
_MESSAGES = {
    401: "authentication required: a valid CDS Hooks client JWT for this endpoint (see docs/cds-hooks.md)",
    403: "not allowed for this client",
    429: "too many requests; retry later",
    503: "temporarily unavailable; retry later",
}


def code_for(status: int) -> str:
    """The OperationOutcome issue code for an HTTP error status."""
    return STATUS_CODES.get(status, "transient" if status >= 500 else "invalid")


class CdsError(Exception):
    """A CDS Hooks call that cannot be answered with cards: HTTP status + one OperationOutcome issue."""

    def __init__(self, status: int, message: str, expression: str | None = None, code: str = "invalid") -> None:
        super().__init__(message)
        self.status, self.message, self.expression, self.code = status, message, expression, code

    def response(self) -> JSONResponse:
        """The JSON response for this error (a 503 gets ``Retry-After`` from the observability middleware)."""
        return JSONResponse(outcome(self.message, self.expression, self.code), self.status)


def issue(
    message: str, expression: str | None = None, code: str = "invalid", severity: str = "error"
) -> dict[str, Any]:
    """One OperationOutcome issue."""
    item: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": message}
    if expression:
        item["expression"] = [expression]
    return item


def outcome(message: str, expression: str | None = None, code: str = "invalid") -> dict[str, Any]:
    """An OperationOutcome with one error issue."""
    return {"resourceType": "OperationOutcome", "issue": [issue(message, expression, code)]}


def http_error(exc: HTTPException) -> JSONResponse:
    """An HTTPException (raised by a dependency, e.g. the bare 401 of the client JWT check) as an
    OperationOutcome, keeping its status and headers (``WWW-Authenticate``) and saying nothing more."""
    message = _MESSAGES.get(exc.status_code) or (exc.detail if isinstance(exc.detail, str) else "request refused")
    headers = dict(exc.headers or {})
    return JSONResponse(outcome(message, code=code_for(exc.status_code)), exc.status_code, headers=headers or None)


class CdsRoute(APIRoute):
    """Route class of the CDS router: errors raised while solving dependencies or validating the request
    are answered as OperationOutcomes like every other error of these routes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The default handler, wrapped."""
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as exc:
                return http_error(exc)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
                where = ".".join(str(p) for p in first.get("loc", ()))
                return CdsError(400, f"{where}: {first.get('msg')}", where or None).response()

        return handle
