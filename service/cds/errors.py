"""Errors answered as FHIR OperationOutcome bodies (the 3.0 ballot's convention, harmless for 2.0 clients)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class CdsError(Exception):
    """A CDS Hooks call that cannot be answered with cards: HTTP status + one OperationOutcome issue."""

    def __init__(self, status: int, message: str, expression: str | None = None, code: str = "invalid") -> None:
        super().__init__(message)
        self.status, self.message, self.expression, self.code = status, message, expression, code

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
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
