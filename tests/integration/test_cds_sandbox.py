"""The CDS Hooks sandbox session, replayed: every request the official sandbox sent (tests/data/shared/
cds-hooks-sandbox) goes to the real API (uvicorn) after the example stream went through real ingestion and a
real Celery worker, as in the session. Status and card summaries are asserted for every file.

The session ran on 2026-12-05 at 18:00 UTC with the example stream shifted to December 2026; the replay moves
the stream and the captured requests by the time since then, so the look-backs see the same data as the
sandbox did. The captured files carry the sandbox's JWT header and claim names only: tokens are signed here by
a test issuer with the same header members (``jku`` included, and ignored) and the same claims.

Issue 14's numbered problems, each failing before: (1) the draft with ``category`` as an object is used
(furosemide named in d-03; the Mg oxide draft quiets the card in e-03 and e-04); (2) h-01, whose
``serviceRequests`` key cannot be had, answers 200 with the stored critical card instead of 412; (4) the
conflict in b-03 answers 409 with issue code ``conflict``. The captured a-01 (before the demo shift: March
2024 data, older than every look-back) still shows nothing, as it should.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_helpers import TestIssuer
from cds_support import (
    HYPOK,
    capture_shift,
    captured_at,
    example_stream,
    sandbox,
    sandbox_files,
    shift_times,
    validate,
)
from loopback_fhir import LoopbackServer

from service.cds.cards import suggestion_uuid
from workers.events import dump_batch, events_from
from workers.pipeline import get_catalog

pytestmark = pytest.mark.slow
H01 = "sandbox-h-01-patient-view.json"
#: prefetch keys the discovery document asks for since the capture (finished medications, administrations,
#: renal function and patient context)
NEWER_KEYS = (
    "medicationStatementsFinished",
    "medicationRequestsFinished",
    "medicationAdministrations",
    "egfr",
    "creatinine",
    "patient",
    "encounter",
    "procedures",
)
K31 = "Low K 3.1 mmol/L and no Mg measured: check serum magnesium"
EXPECTED: dict[str, tuple[int, list[str]]] = {
    "sandbox-a-01-patient-view.json": (200, []),
    "sandbox-b-01-patient-view.json": (
        200,
        ["Persistent low K 3.1 mmol/L on a diuretic, Mg not measured: check Mg, continue K", K31],
    ),
    "sandbox-b-02-feedback.json": (200, []),
    "sandbox-b-03-feedback.json": (409, []),
    "sandbox-c-01-patient-view.json": (200, [K31]),
    "sandbox-c-02-feedback.json": (200, []),
    "sandbox-d-01-patient-view.json": (200, ["Low K 2.8 mmol/l and no Mg measured: check serum magnesium"]),
    "sandbox-d-02-order-select.json": (200, ["Low K 2.8 mmol/l and no Mg measured: check serum magnesium"]),
    "sandbox-d-03-order-select.json": (200, ["Low K 2.8 mmol/l and no Mg measured: check serum magnesium"]),
    "sandbox-d-04-feedback.json": (200, []),
    "sandbox-e-01-patient-view.json": (200, ["Low K 3.2 mmol/L and no Mg measured: check serum magnesium"]),
    "sandbox-e-02-order-select.json": (200, ["Low K 3.2 mmol/L and no Mg measured: check serum magnesium"]),
    "sandbox-e-03-order-select.json": (200, []),  # a draft magnesium oxide order answers "Mg measured?"
    "sandbox-e-04-order-sign.json": (200, []),
    "sandbox-f-01-patient-view.json": (200, [K31]),  # the refractory card was accepted in b-02
    "sandbox-f-02-feedback.json": (200, []),
    "sandbox-g-01-patient-view.json": (200, ["Low Mg 1.4 mg/dL with arrhythmia: consider IV magnesium sulfate 2 g"]),
    "sandbox-g-02-feedback.json": (200, []),
    "sandbox-h-01-patient-view.json": (200, ["Low Mg 1.2 mEq/L with QTc 520 ms: consider IV magnesium sulfate 2 g"]),
}


class Session:
    """Replays captured requests against one API, signing each like the sandbox did."""

    def __init__(self, base: str, issuer: TestIssuer) -> None:
        self.base, self.issuer = base, issuer
        self.delta = datetime.now(UTC) - captured_at()
        self.cards: list[dict[str, Any]] = []  # of the last service call
        self.mapped: dict[str, dict[str, Any]] = {}  # captured card uuid -> the replayed card
        self.constraints = _feedback_constraints()

    def body(self, name: str) -> dict[str, Any]:
        """The captured body, moved in time (a-01 was captured before the demo shift: kept as it was)."""
        captured = sandbox(name)["body"]
        body = copy.deepcopy(captured) if name.startswith("sandbox-a-") else shift_times(captured, self.delta)
        if isinstance(body.get("prefetch"), dict):  # keys discovery added after the capture: the EHR has none
            for key in NEWER_KEYS:
                body["prefetch"].setdefault(key, None)
        return body

    def send(self, name: str, body: dict[str, Any] | None = None) -> httpx.Response:
        captured = sandbox(name)
        url = f"{self.base}{captured['url_path']}"
        header = {k: v for k, v in captured["jwt_header"].items() if k not in ("alg", "kid", "typ")}
        token = self.issuer.token(url, alg=captured["jwt_header"]["alg"], headers=header)
        assert set(_claims(token)) == set(captured["jwt_claims_keys"])
        body = self.body(name) if body is None else body
        if "feedback" in body:
            body = self.feedback(body)
        response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert response.status_code < 500, response.text
        if "feedback" not in body and response.status_code == 200:
            validate(response.json(), "ServiceResponse")
            self.cards = response.json()["cards"]
        return response

    def feedback(self, body: dict[str, Any]) -> dict[str, Any]:
        """The captured feedback with the captured card and suggestion uuids replaced by those of the replayed
        card it was about (found by what the feedback says of it: a suggestion, an override reason)."""
        for item in body["feedback"]:
            captured = item["card"]
            if captured not in self.mapped:
                wanted = self.constraints[captured]
                fits = [c for c in self.cards if _fits(c, wanted)]
                assert len(fits) == 1, (captured, [c["summary"] for c in self.cards])
                self.mapped[captured] = fits[0]
            card = self.mapped[captured]
            item["card"] = card["uuid"]
            for accepted in item.get("acceptedSuggestions", []):
                sid = wanted_suggestion(captured, accepted["id"])
                accepted["id"] = suggestion_uuid(card["uuid"], sid)
        return body


def _claims(token: str) -> dict[str, Any]:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})


def wanted_suggestion(card: str, suggestion: str) -> str:
    """The rule suggestion id a captured suggestion uuid stands for (uuid5 of card uuid and suggestion id)."""
    ids = {s.id for r in get_catalog().rules for s in r.card.suggestions}
    (found,) = [sid for sid in ids if suggestion_uuid(card, sid) == suggestion]
    return found


def _feedback_constraints() -> dict[str, dict[str, set[str]]]:
    """Per captured card uuid: the suggestion ids accepted and override reason codes given in the session."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: {"suggestions": set(), "reasons": set()})
    for path in sandbox_files():
        for item in json.loads(path.read_text())["body"].get("feedback", []):
            wanted = found[item["card"]]
            for accepted in item.get("acceptedSuggestions", []):
                wanted["suggestions"].add(wanted_suggestion(item["card"], accepted["id"]))
            reason = (item.get("overrideReason") or {}).get("reason")
            if reason:
                wanted["reasons"].add(reason["code"])
    return found


def _fits(card: dict[str, Any], wanted: dict[str, set[str]]) -> bool:
    suggestions = {s["uuid"] for s in card.get("suggestions", [])}
    reasons = {r["code"] for r in card.get("overrideReasons", [])}
    return (
        all(suggestion_uuid(card["uuid"], s) in suggestions for s in wanted["suggestions"])
        and wanted["reasons"] <= reasons
    )


def _summaries(response: httpx.Response) -> list[str]:
    return [c["summary"] for c in response.json().get("cards", [])] if response.status_code == 200 else []


def _start(stack: Any, tmp_path: Path, **env: str) -> tuple[str, TestIssuer]:
    issuer = TestIssuer(tmp_path)
    return stack.start_api(**issuer.env(), **env), issuer


def _stream_through_a_worker(stack: Any, delta: Any) -> None:
    """The example stream, moved like the session's, through HTTP ingestion and a real Celery worker."""
    stack.start_worker()
    response = stack.post_ndjson(shift_times(example_stream(), capture_shift() + delta))
    assert response.status_code == 202, response.text
    stack.drain()


def test_every_captured_sandbox_request_replayed(stack: Any, tmp_path: Path) -> None:
    base, issuer = _start(stack, tmp_path)
    session = Session(base, issuer)
    _stream_through_a_worker(stack, session.delta)
    assert [p.name for p in sandbox_files()] == list(EXPECTED)
    answers = {}
    for path in sandbox_files():
        response = session.send(path.name)
        answers[path.name] = (response.status_code, _summaries(response))
        if path.name == "sandbox-d-03-order-select.json":  # (1) the draft furosemide is named on the card
            (card,) = response.json()["cards"]
            assert "**Being ordered:** Furosemide 40 MG Oral Tablet" in card["detail"], card["detail"]
        if path.name == "sandbox-b-03-feedback.json":  # (4) override after accept is a conflict
            assert [i["code"] for i in response.json()["issue"]] == ["conflict"], response.text
        if path.name == "sandbox-h-01-patient-view.json":  # (2) the stored critical alert is not blanked
            (card,) = response.json()["cards"]
            assert card["indicator"] == "critical" and "Not re-checked" not in card.get("detail", "")
    assert answers == EXPECTED
    # The EHR's feedback moved the alerts the pharmacist sees, with the EHR as the actor.
    refractory = stack.store.find_alert(session.mapped["9617e144-edfb-49c4-aa8b-cfe607a36524"]["uuid"])
    assert refractory["status"] == "accepted"
    last = refractory["history"][-1]
    assert (last["action"], last["by"], last["source"]) == ("accept", f"ehr:{issuer.issuer}", "cds-hooks")

    # (2) The same h-01 with the key null (the EHR has no such data) gives the same card.
    h01 = session.body("sandbox-h-01-patient-view.json")
    h01["prefetch"]["serviceRequests"] = None
    assert _summaries(session.send("sandbox-h-01-patient-view.json", h01)) == EXPECTED[H01][1]

    # Partial prefetch with a stored alert whose rule reads the missing key: the stored card, with a note.
    e01 = session.body("sandbox-e-01-patient-view.json")
    del e01["prefetch"]["magnesium"]
    response = session.send("sandbox-e-01-patient-view.json", e01)
    (card,) = response.json()["cards"]
    assert card["summary"] == EXPECTED["sandbox-e-01-patient-view.json"][1][0]
    assert "Not re-checked with the data of this request: magnesium results could not be retrieved" in card["detail"]
    stored = next(a for a in stack.store.alerts_for_patient("ex-echo", open_only=True) if a["rule_id"] == HYPOK)
    assert card["uuid"] == stored["id"]

    # Nothing stored and nothing fetchable: 412, one issue per key, naming the rules not checked.
    empty = {**e01, "hookInstance": str(uuid.uuid4()), "context": {**e01["context"], "patientId": "ex-nobody"}}
    empty["prefetch"] = {}
    response = session.send("sandbox-e-01-patient-view.json", empty)
    assert response.status_code == 412, response.text
    issues = response.json()["issue"]
    assert {i["expression"][0] for i in issues} == {f"prefetch.{k}" for k in e01["prefetch"]} | {"prefetch.magnesium"}
    assert {i["code"] for i in issues} == {"not-supported"}  # the sandbox's fhirServer is http
    assert any(HYPOK in i["diagnostics"] for i in issues)


def test_a_fhir_server_refusing_one_search_never_hides_stored_alerts(stack: Any, tmp_path: Path) -> None:
    """h-01 against a real FHIR server (loopback) that refuses ServiceRequest searches, as the issue found."""
    base, issuer = _start(stack, tmp_path, EHR_ALERTS_CDS_FHIR_REQUIRE_HTTPS="false")
    session = Session(base, issuer)
    resources = shift_times(example_stream(), capture_shift() + session.delta)
    from rules.normalize import normalize_resource
    from workers.pipeline import process_batch

    events = [events_from(normalize_resource(r), received=datetime.now(UTC)) for r in resources]
    process_batch(dump_batch([e for e in events if e is not None]), stack.store)
    with LoopbackServer() as fhir:
        fhir.reset(resources)
        fhir.refuse = {"ServiceRequest": 403}
        h01 = session.body(H01)
        h01["fhirServer"] = fhir.url
        response = session.send(H01, h01)
        assert _summaries(response) == EXPECTED[H01][1]
        assert [r.path for r in fhir.requests] == ["/fhir/ServiceRequest"]
        # The rule that reads ServiceRequests (hypokalemia, stored and open for ex-echo): its stored card, noted.
        e01 = session.body("sandbox-e-01-patient-view.json")
        e01["fhirServer"] = fhir.url
        del e01["prefetch"]["serviceRequests"]
        (card,) = session.send("sandbox-e-01-patient-view.json", e01).json()["cards"]
        assert "lab orders (ServiceRequest) could not be retrieved" in card["detail"]
        # A patient with nothing stored: nothing can be said -> 412 with the refusal as `incomplete`.
        nobody = {**e01, "hookInstance": str(uuid.uuid4()), "context": {**e01["context"], "patientId": "ex-x"}}
        response = session.send("sandbox-e-01-patient-view.json", nobody)
        assert response.status_code == 412, response.text
        (issue,) = response.json()["issue"]
        assert issue["code"] == "incomplete" and "refused the search (HTTP 403)" in issue["diagnostics"]
        # A stalled server: the deadline is a gap of its own (`timeout`); the stored alerts are still shown.
        fhir.refuse, fhir.stall_seconds = {}, 5.0
        response = session.send(H01, {**h01, "hookInstance": str(uuid.uuid4())})
        assert _summaries(response) == EXPECTED[H01][1]
