"""CDS Hooks feedback on a card that came from a call alone (the stream had no alert for it) reaches the
pharmacist: it is recorded in the alert store as an alert of that rule and patient, under the card's uuid, and
shows in the worklist, the alert detail, the audit export and the analytics (issue 13), over real HTTP.
When the stream later evaluates the patient, that alert is its open alert for the episode: one alert, the
clinician's outcome kept.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_helpers import TestIssuer, review_env, review_headers
from cds_support import HYPOK, SERVICE, hook_request, prefetch_for, scenario

from rules.normalize import normalize_resource
from workers.events import dump_batch, events_from
from workers.pipeline import process_batch

pytestmark = pytest.mark.slow
PV = f"/cds-services/{SERVICE['patient-view']}"


class Ehr:
    """The EHR side: signed CDS calls and feedback."""

    def __init__(self, base: str, issuer: TestIssuer) -> None:
        self.base, self.issuer = base, issuer

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        url = self.base + path
        headers = {"Authorization": f"Bearer {self.issuer.token(url)}"}
        response = httpx.post(url, json=body, headers=headers, timeout=30)
        assert response.status_code < 500, response.text
        return response

    def cards(self, patient: str, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        response = self.post(PV, hook_request("patient-view", patient, prefetch_for(resources, patient)))
        assert response.status_code == 200, response.text
        return response.json()["cards"]

    def feedback(self, item: dict[str, Any]) -> httpx.Response:
        return self.post(f"{PV}/feedback", {"feedback": [item]})


def _review(base: str, path: str, roles: list[str], **params: Any) -> httpx.Response:
    response = httpx.get(base + path, params=params, headers=review_headers("pharm-1", roles), timeout=30)
    assert response.status_code == 200, response.text
    return response


def test_feedback_on_a_call_only_card_is_seen_in_the_worklist_audit_and_analytics(stack: Any, tmp_path: Path) -> None:
    issuer = TestIssuer(tmp_path)
    base = stack.start_api(**issuer.env(), **review_env(tmp_path))
    ehr = Ehr(base, issuer)
    started = datetime.now(UTC) - timedelta(minutes=1)
    overridden_patient, accepted_patient = "cds-only-1", "cds-only-2"
    resources = scenario(HYPOK, overridden_patient)

    (card,) = ehr.cards(overridden_patient, resources)
    assert stack.store.find_alert(card["uuid"]) is None  # showing a card writes nothing to the alert store
    reason = card["overrideReasons"][0]
    override = {
        "card": card["uuid"],
        "outcome": "overridden",
        "outcomeTimestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "overrideReason": {"reason": {k: reason[k] for k in ("system", "code")}, "userComment": "checked by phone"},
    }
    answer = ehr.feedback(override)
    assert answer.status_code == 200 and answer.json()["feedback"][0]["alertStatus"] == "overridden", answer.text
    assert ehr.feedback(override).status_code == 200  # a repeat is a no-op
    (accepted_card,) = ehr.cards(accepted_patient, scenario(HYPOK, accepted_patient))
    accept = {
        "card": accepted_card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": accepted_card["suggestions"][0]["uuid"]}],
        "outcomeTimestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    assert ehr.feedback(accept).status_code == 200

    # The worklist: both, with their status and patient.
    rows = _review(base, "/api/review/alerts", ["pharmacist"], status="all").json()["items"]
    found = {r["id"]: (r["patient"], r["rule_id"], r["status"]) for r in rows}
    assert found[card["uuid"]] == (overridden_patient, HYPOK, "overridden")
    assert found[accepted_card["uuid"]] == (accepted_patient, HYPOK, "accepted")

    # The detail: who in the EHR did what and why, after the card was shown by which hook to which user.
    detail = _review(base, f"/api/review/alerts/{card['uuid']}", ["pharmacist"]).json()
    opened, acted = detail["history"]
    assert (
        opened["by"] == "system:cds-hooks"
        and "patient-view" in opened["why"]
        and "Practitioner/example" in opened["why"]
    )
    assert (acted["by"], acted["source"], acted["reason"]["code"]) == (
        f"ehr:{issuer.issuer}",
        "cds-hooks",
        reason["code"],
    )
    assert acted["why"] == f"{reason['display']}: checked by phone"
    assert detail["evidence"] and detail["card"]["summary"] == card["summary"]

    # The audit export and the analytics.
    window = {"from": started.isoformat(), "to": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}
    audit = _review(base, "/api/review/audit", ["admin"], format="ndjson", **window).text.splitlines()
    mine = [json.loads(line) for line in audit if card["uuid"] in line]
    assert [(r["action"], r["source"], r["reason"]) for r in mine][-1] == ("override", "cds-hooks", reason["code"])
    figures = _review(base, "/api/review/analytics", ["admin"]).json()["rules"]
    hypok = next(f for f in figures if f["rule_id"] == HYPOK)
    assert hypok["overridden"] >= 1 and hypok["accepted"] >= 1 and hypok["override_reasons"].get(reason["code"]) == 1

    # Handled: the EHR does not show it again.
    assert ehr.cards(overridden_patient, resources) == []

    # The stream catches up: the recorded alert is the episode's open alert (one alert, outcome kept).
    events = [events_from(normalize_resource(r), received=datetime.now(UTC)) for r in resources]
    process_batch(dump_batch([e for e in events if e is not None]), stack.store)
    (alert,) = [a for a in stack.store.alerts_for_patient(overridden_patient, open_only=True) if a["rule_id"] == HYPOK]
    assert alert["id"] == card["uuid"] and alert["status"] == "overridden"
    assert ehr.cards(overridden_patient, resources) == []
