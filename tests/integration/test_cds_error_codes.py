"""Every error path of the CDS routes, walked over real HTTP (uvicorn, real Redis, a loopback FHIR server):
each answer is a FHIR OperationOutcome whose issue code names the problem (docs/cds-hooks.md, *Error answers*).

Three API processes: a healthy one (https not required for the loopback FHIR server, which is the only server
registered for the test issuer; one page per key at most), and two whose Redis is down (with and without client
authentication: the JWT replay check and the alert store each answer 503).
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_helpers import TestIssuer
from cds_support import HYPOK, SERVICE, api_process, hook_request, prefetch_for, scenario
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient
from fhir.resources.R4B.operationoutcome import OperationOutcome
from loopback_fhir import LoopbackFhir, LoopbackServer

from service.cds.errors import CdsRoute

pytestmark = pytest.mark.slow
#: FHIR R4 IssueType (http://hl7.org/fhir/R4/valueset-issue-type.html)
ISSUE_TYPES = frozenset(
    [
        "invalid",
        "structure",
        "required",
        "value",
        "invariant",
        "security",
        "login",
        "unknown",
        "expired",
        "forbidden",
        "suppressed",
        "processing",
        "not-supported",
        "duplicate",
        "multiple-matches",
        "not-found",
        "deleted",
        "too-long",
        "code-invalid",
        "extension",
        "too-costly",
        "business-rule",
        "conflict",
        "transient",
        "lock-error",
        "no-store",
        "exception",
        "timeout",
        "incomplete",
        "throttled",
        "informational",
    ]
)
PV = f"/cds-services/{SERVICE['patient-view']}"
FEEDBACK = f"{PV}/feedback"


@dataclass
class Apis:
    base: str
    dead: str
    dead_open: str
    issuer: TestIssuer
    fhir: LoopbackFhir

    def headers(self, base: str, path: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.token(base + path)}"}

    def post(self, path: str, body: Any = None, *, base: str | None = None, auth: bool = True, **kw: Any) -> Any:
        base = base or self.base
        headers = {**(self.headers(base, path) if auth else {}), **kw.pop("headers", {})}
        if body is not None:
            kw["json"] = body
        return httpx.post(base + path, headers=headers, timeout=30, **kw)


def _dead_redis() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


@pytest.fixture(scope="module")
def apis(module_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apis]:
    logs = tmp_path_factory.mktemp("cds-errors")
    issuer = TestIssuer(logs)
    with LoopbackServer() as fhir:
        env = {
            **issuer.env(),
            "REDIS_URL": module_redis_url,
            "EHR_ALERTS_KEY_PREFIX": f"test-{uuid.uuid4().hex[:12]}",
            "EHR_ALERTS_CDS_FHIR_REQUIRE_HTTPS": "false",
            "EHR_ALERTS_CDS_FHIR_SERVERS": json.dumps({issuer.issuer: [fhir.url]}),
            "EHR_ALERTS_CDS_FHIR_TIMEOUT_SECONDS": "1",
            "EHR_ALERTS_CDS_FHIR_MAX_PAGES": "1",
            "EHR_ALERTS_CDS_FHIR_PAGE_SIZE": "1",
            "EHR_ALERTS_MAX_BODY_BYTES": "100000",
        }
        dead = {**env, "REDIS_URL": _dead_redis()}
        with (
            api_process(env, logs / "api.log") as base,
            api_process(dead, logs / "dead.log") as dead_base,
            api_process({**dead, "EHR_ALERTS_CDS_AUTH_ENABLED": "false"}, logs / "open.log") as open_base,
        ):
            yield Apis(base, dead_base, open_base, issuer, fhir)


def _call(patient: str | None = None, **extra: Any) -> dict[str, Any]:
    patient = patient or f"p{uuid.uuid4().hex[:10]}"
    return hook_request("patient-view", patient, prefetch_for(scenario(HYPOK, patient), patient), **extra)


def _without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    prefetch = {k: v for k, v in body["prefetch"].items() if k not in keys}
    return {**body, "prefetch": prefetch}


def _conflict(apis: Apis) -> Any:
    """Accept a card, then override it: the second is a transition the alert's status does not allow."""
    response = apis.post(PV, _call())
    (card,) = response.json()["cards"]
    accept = {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
        "outcomeTimestamp": "2026-12-05T18:00:12Z",
    }
    assert apis.post(FEEDBACK, {"feedback": [accept]}).status_code == 200
    override = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-12-05T18:00:15Z"}
    return apis.post(FEEDBACK, {"feedback": [override]})


def _fhir(apis: Apis, **behaviour: Any) -> Callable[[], Any]:
    """A call whose magnesium key must come from the loopback FHIR server, behaving as told."""

    def run() -> Any:
        apis.fhir.reset([])
        for name, value in behaviour.items():
            setattr(apis.fhir, name, value)
        body = _without(_call(fhir_server=apis.fhir.url), "magnesium")
        return apis.post(PV, body)

    return run


def _many_pages(apis: Apis) -> Any:
    patient = f"p{uuid.uuid4().hex[:10]}"
    resources = scenario(HYPOK, patient)
    apis.fhir.reset(resources + scenario(HYPOK, patient))  # two potassium results: two pages of one
    return apis.post(PV, _without(_call(patient, fhir_server=apis.fhir.url), "potassium"))


# name -> (request, status, issue code, expression of the first issue or None, header that must be present)
CASES: dict[str, tuple[Callable[[Apis], Any], int, str, str | None, str | None]] = {
    "discovery without a token": (
        lambda a: httpx.get(a.base + "/cds-services"),
        401,
        "login",
        None,
        "www-authenticate",
    ),
    "discovery with a bad token": (
        lambda a: httpx.get(a.base + "/cds-services", headers={"Authorization": "Bearer x.y.z"}),
        401,
        "login",
        None,
        "www-authenticate",
    ),
    "service without a token": (lambda a: a.post(PV, _call(), auth=False), 401, "login", None, None),
    "unknown service": (lambda a: a.post("/cds-services/nope", _call()), 404, "not-found", "id", None),
    "wrong content type": (
        lambda a: a.post(PV, content=b"{}", headers={"Content-Type": "text/plain"}),
        415,
        "not-supported",
        None,
        None,
    ),
    "body over the limit": (
        lambda a: a.post(PV, {**_call(), "extension": {"x": "y" * 120_000}}),
        413,
        "too-costly",
        None,
        None,
    ),
    "body not JSON": (
        lambda a: a.post(PV, content=b"{nope", headers={"Content-Type": "application/json"}),
        400,
        "structure",
        None,
        None,
    ),
    "body not an object": (lambda a: a.post(PV, []), 400, "structure", None, None),
    "hookInstance missing": (
        lambda a: a.post(PV, {k: v for k, v in _call().items() if k != "hookInstance"}),
        400,
        "required",
        "hookInstance",
        None,
    ),
    "wrong hook for the service": (
        lambda a: a.post(f"/cds-services/{SERVICE['order-sign']}", _call()),
        400,
        "invalid",
        "hook",
        None,
    ),
    "fhirServer not registered for the issuer": (
        lambda a: a.post(PV, _call(fhir_server="https://elsewhere.example/fhir")),
        412,
        "forbidden",
        "fhirServer",
        None,
    ),
    "data missing and no fhirServer": (
        lambda a: a.post(PV, _without(_call(), "magnesium")),
        412,
        "required",
        "prefetch.magnesium",
        None,
    ),
    "FHIR server error": (lambda a: _fhir(a, fail_status=500)(), 412, "incomplete", "prefetch.magnesium", None),
    "FHIR server refuses the search": (
        lambda a: _fhir(a, refuse={"Observation": 403})(),
        412,
        "incomplete",
        "prefetch.magnesium",
        None,
    ),
    "FHIR server too slow": (lambda a: _fhir(a, stall_seconds=3.0)(), 412, "timeout", "prefetch.magnesium", None),
    "more pages than allowed": (_many_pages, 412, "too-costly", "prefetch.potassium", None),
    "feedback without a token": (
        lambda a: a.post(FEEDBACK, {"feedback": []}, auth=False),
        401,
        "login",
        None,
        None,
    ),
    "feedback for an unknown service": (
        lambda a: a.post("/cds-services/nope/feedback", {"feedback": []}),
        404,
        "not-found",
        "id",
        None,
    ),
    "feedback malformed": (
        lambda a: a.post(FEEDBACK, {"feedback": [{"card": "c", "outcome": "maybe"}]}),
        400,
        "invalid",
        "feedback[0].outcome",
        None,
    ),
    "feedback for an unknown card": (
        lambda a: a.post(
            FEEDBACK,
            {
                "feedback": [
                    {"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-12-05T18:00:00Z"}
                ]
            },
        ),
        404,
        "not-found",
        "feedback[0].card",
        None,
    ),
    "feedback conflict: override after accept": (_conflict, 409, "conflict", "feedback[0].card", None),
    "JWT replay check without Redis": (
        lambda a: httpx.get(a.dead + "/cds-services", headers=a.headers(a.dead, "/cds-services")),
        503,
        "transient",
        None,
        "retry-after",
    ),
    "service call without the alert store": (
        lambda a: a.post(PV, _call(), base=a.dead_open),
        503,
        "transient",
        None,
        "retry-after",
    ),
    "feedback without the alert store": (
        lambda a: a.post(
            FEEDBACK,
            {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-12-05T18:00:00Z"}]},
            base=a.dead_open,
        ),
        503,
        "transient",
        None,
        "retry-after",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_error_answer_is_an_operation_outcome_with_the_right_issue_code(apis: Apis, name: str) -> None:
    request, status, code, expression, header = CASES[name]
    response = request(apis)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    OperationOutcome.model_validate(body)
    codes = {i["code"] for i in body["issue"]}
    assert codes <= ISSUE_TYPES and body["issue"][0]["code"] == code, body
    if expression:
        assert body["issue"][0]["expression"] == [expression], body
    if header:
        assert response.headers.get(header), dict(response.headers)


def test_errors_raised_by_dependencies_keep_their_status_and_headers() -> None:
    """Any HTTPException a dependency of a CDS route raises (a future rate limiter: 429) is an OperationOutcome."""
    from fastapi import APIRouter

    def limited() -> None:
        raise HTTPException(429, "slow down", headers={"Retry-After": "3"})

    router = APIRouter(route_class=CdsRoute)

    @router.get("/x", dependencies=[Depends(limited)])
    def x() -> dict[str, str]:
        return {}

    @router.get("/y/{n}")
    def y(n: int) -> dict[str, int]:
        return {"n": n}

    app = FastAPI()
    app.include_router(router)
    with TestClient(app) as client:
        response = client.get("/x")
        assert response.status_code == 429 and response.headers["retry-after"] == "3"
        assert response.json()["issue"][0]["code"] == "throttled"
        response = client.get("/y/not-a-number")
        assert response.status_code == 400 and response.json()["issue"][0]["code"] == "invalid"


def test_the_docs_table_lists_every_code_walked() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cds-hooks.md").read_text()
    table = docs[docs.index("### Error answers") : docs.index("## Registering")]
    for _, status, code, _, _ in CASES.values():
        row = next(
            (line for line in table.splitlines() if line.startswith(f"| {status} |") and f"`{code}`" in line), None
        )
        assert row, (status, code)
