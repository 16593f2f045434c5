"""The review API on a real Redis: filters, ordering, cursor pagination, every legal and illegal transition,
concurrent edits, roles, snooze expiry, the lifecycle's statuses and escalation, grouping by patient, the
"n new" poll, bulk acknowledge, patient context through the seam, display times, CDS Hooks alerts, analytics
figures on a known data set, the audit export and the data-problems queue."""

from __future__ import annotations

import csv
import io
import json
import logging
from datetime import datetime, timedelta
from typing import Any

import pytest
from itest_builders import potassium
from review_support import (
    HYPOK,
    REFRACTORY,
    T0,
    as_user,
    cds_only_alert,
    close,
    directory,
    escalate,
    live_clock,
    review_client,
    seed,
    ward,
    ward_directory,
)

from service.review import patients as directory_seam
from workers.state import review_index as rq
from workers.state.context_index import ContextIndex

pytestmark = pytest.mark.slow

PHARMACIST = as_user("alice", "pharmacist")
BOB = as_user("bob", "pharmacist")
VIEWER = as_user("victor", "viewer")
ADMIN = as_user("ada", "admin")


@pytest.fixture
def api(store, module_redis_url, key_prefix, monkeypatch, tmp_path):
    seed(store, ward())
    live_clock(store)  # raised when the data came, as on a live feed
    with review_client(monkeypatch, module_redis_url, key_prefix, tmp_path) as client:
        yield client


def _list(api, headers=PHARMACIST, **params):
    response = api.get("/api/review/alerts", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _alert_of(api, patient, rule=HYPOK):
    items = _list(api, status="all", patient=patient, rule=rule)["items"]
    assert len(items) == 1, items
    return api.get(f"/api/review/alerts/{items[0]['id']}", headers=PHARMACIST).json()


def _act(api, alert_id, action, revision, headers=PHARMACIST, **fields):
    body = {"action": action, "revision": revision, **fields}
    return api.post(f"/api/review/alerts/{alert_id}/transitions", json=body, headers=headers)


# --- list, filters, order, pagination -----------------------------------------------------------------------


def test_default_list_is_open_alerts_most_severe_then_oldest(api):
    page = _list(api)
    rows = [(a["patient"], a["rule_id"], a["severity"]) for a in page["items"]]
    warnings, infos = rows[:3], rows[3:]
    assert {r[2] for r in warnings} == {"warning"} and {r[2] for r in infos} == {"info"}
    assert [r[0] for r in infos] == ["p2", "p3", "p5"]  # oldest first within a severity
    assert [r[0] for r in warnings][-1] == "p4"  # p1's two alerts opened before p4's
    assert page["counts"]["todo"] == 6 and page["counts"]["active"] == 6 and page["counts"]["all"] == 6
    assert page["counts"]["open"] == 6 and page["counts"]["closed"] == 0
    assert page["next_cursor"] is None
    p1 = next(a for a in page["items"] if a["patient"] == "p1")
    assert p1["latest"]["potassium"]["reported"] == "2.8 mmol/L"
    assert p1["latest"]["magnesium"] is None


def test_filters(api):
    refractory = _list(api, rule=REFRACTORY)
    assert [a["patient"] for a in refractory["items"]] == ["p1"]
    assert (refractory["counts"]["todo"], refractory["counts"]["all"]) == (1, 1)  # counts follow the rule filter
    assert [a["patient"] for a in _list(api, severity="info")["items"]] == ["p2", "p3", "p5"]
    assert [a["rule_id"] for a in _list(api, patient="p1", sort="oldest")["items"]] == [HYPOK, REFRACTORY]
    assert [a["patient"] for a in _list(api, q="2.9 mmol")["items"]] == ["p4"]
    first = _list(api, patient="p1", limit=1)
    second = _list(api, patient="p1", limit=1, cursor=first["next_cursor"])
    assert {first["items"][0]["rule_id"], second["items"][0]["rule_id"]} == {HYPOK, REFRACTORY}
    assert second["next_cursor"] is None
    window = _list(
        api, opened_from=(T0 + timedelta(minutes=30)).isoformat(), opened_to=(T0 + timedelta(hours=3)).isoformat()
    )
    assert sorted(a["patient"] for a in window["items"]) == ["p2", "p3", "p4"]
    assert [a["patient"] for a in _list(api, sort="newest", severity="info")["items"]] == ["p5", "p3", "p2"]
    assert _list(api, status="resolved")["items"] == []


def test_bad_filters_are_400_operation_outcomes(api):
    bad = ({"status": "open-ish"}, {"severity": "huge"}, {"sort": "random"}, {"limit": 0}, {"encounter_class": "a b"})
    for params in (*bad, {"patient": "x" * 101}):
        response = api.get("/api/review/alerts", params=params, headers=PHARMACIST)
        assert response.status_code == 400, params
        assert response.json()["resourceType"] == "OperationOutcome"
    response = api.get("/api/review/alerts", params={"opened_from": "yesterday"}, headers=PHARMACIST)
    assert response.status_code == 400 and "opened_from" in response.json()["issue"][0]["diagnostics"]


def test_cursor_pagination_walks_everything_once_in_order(api):
    full = [a["id"] for a in _list(api, status="all")["items"]]
    for sort in ("severity", "oldest", "newest"):
        expected = [a["id"] for a in _list(api, status="all", sort=sort)["items"]]
        seen, cursor, pages = [], None, 0
        while True:
            params = {"status": "all", "sort": sort, "limit": 2, **({"cursor": cursor} if cursor else {})}
            page = _list(api, **params)
            seen += [a["id"] for a in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == expected, sort
        assert pages >= 3
    assert sorted(full) == sorted(seen)


def test_cursor_is_bound_to_its_filters(api):
    cursor = _list(api, limit=2)["next_cursor"]
    assert cursor
    other = api.get("/api/review/alerts", params={"limit": 2, "cursor": cursor, "rule": HYPOK}, headers=PHARMACIST)
    assert other.status_code == 400 and "cursor" in other.json()["issue"][0]["expression"]
    junk = api.get("/api/review/alerts", params={"cursor": "not-a-cursor"}, headers=PHARMACIST)
    assert junk.status_code == 400


def test_page_of_a_changed_list_skips_nothing_before_the_cursor(api):
    first = _list(api, limit=3)
    acted = first["items"][0]
    assert _act(api, acted["id"], "override", acted["revision"], reason="mg-already-ordered").status_code == 200
    rest = _list(api, limit=10, cursor=first["next_cursor"])
    assert {a["id"] for a in rest["items"]}.isdisjoint({a["id"] for a in first["items"]})
    assert len(rest["items"]) == 3


# --- detail ---------------------------------------------------------------------------------------------------


def test_detail_has_evidence_trend_rule_citations_and_history(api):
    detail = _alert_of(api, "p1", REFRACTORY)
    assert detail["rule_id"] == REFRACTORY and detail["rule_version"]
    refs = {e["reference"] for e in detail["evidence"]}
    assert "Observation/k-p1-b/_history/1" in refs
    k = next(e for e in detail["evidence"] if e["resource_id"] == "k-p1-b")
    assert (k["value"], k["unit"], k["time"]) == ("2.8", "mmol/L", "2024-04-01T06:00:00Z")
    assert [p["value"] for p in detail["trend"]["potassium"]] == [3.1, 2.8]
    assert detail["trend"]["potassium"][0]["unit"] == "mmol/L"
    assert detail["trend"]["end"].startswith("2024-04-01")
    acted = _act(api, detail["id"], "acknowledge", detail["revision"]).json()
    assert acted["trend"] == detail["trend"]  # a user's action (wall clock) does not move the window
    assert detail["explanation"] and detail["citations"] and detail["citations"][0]["url"].startswith("https://")
    assert {r["code"] for r in detail["override_reasons"]} >= {"goals-of-care"}
    assert detail["history"][0]["action"] == "opened" and detail["history"][0]["by"] == "system"
    assert api.get("/api/review/alerts/no-such-alert", headers=PHARMACIST).status_code == 404


# --- transitions ----------------------------------------------------------------------------------------------

LEGAL = {
    "active": {"acknowledge", "override", "snooze", "resolve"},
    "acknowledged": {"override", "snooze", "resolve", "reopen"},
    "snoozed": {"override", "snooze", "resolve", "reopen"},
    "overridden": {"resolve", "reopen"},
    "resolved": {"reopen"},
}
PATH_TO = {  # from active
    "active": [],
    "acknowledged": ["acknowledge"],
    "snoozed": ["snooze"],
    "overridden": ["override"],
    "resolved": ["resolve"],
}


def _fields(action):
    if action == "override":
        return {"reason": "goals-of-care", "comment": "palliative"}
    if action == "snooze":
        return {"until": (rq.utcnow() + timedelta(hours=2)).isoformat()}
    return {}


def test_every_transition_from_every_status(api):
    alert = _alert_of(api, "p2")
    alert_id, revision = alert["id"], alert["revision"]
    checked = 0
    for status, path in PATH_TO.items():
        for action in ("acknowledge", "override", "snooze", "resolve", "reopen"):
            for step in path:
                response = _act(api, alert_id, step, revision, **_fields(step))
                assert response.status_code == 200, (status, step, response.text)
                revision = response.json()["revision"]
            assert api.get(f"/api/review/alerts/{alert_id}", headers=PHARMACIST).json()["status"] == status
            response = _act(api, alert_id, action, revision, **_fields(action))
            if action in LEGAL[status]:
                assert response.status_code == 200, (status, action, response.text)
                body = response.json()
                assert body["revision"] == revision + 1
                last = body["history"][-1]
                assert (last["action"], last["by"], last["from"]) == (action, "user:alice", status)
                revision = body["revision"]
            else:
                assert response.status_code == 409, (status, action, response.text)
                problem = response.json()
                assert problem["resourceType"] == "OperationOutcome"
                assert f"cannot {action}" in problem["issue"][0]["diagnostics"]
            checked += 1
            current = api.get(f"/api/review/alerts/{alert_id}", headers=PHARMACIST).json()
            if current["status"] != "active":
                response = _act(api, alert_id, "reopen", current["revision"])
                assert response.status_code == 200, response.text
            revision = api.get(f"/api/review/alerts/{alert_id}", headers=PHARMACIST).json()["revision"]
    assert checked == 25
    history = api.get(f"/api/review/alerts/{alert_id}", headers=PHARMACIST).json()["history"]
    override = next(h for h in history if h["action"] == "override")
    assert override["reason"]["code"] == "goals-of-care" and override["comment"] == "palliative"


def test_retracted_alert_takes_no_transition(store, api):
    seed(store, [potassium("k-p2", "p2", 3.2, T0 + timedelta(hours=1), version=2, status="entered-in-error")])
    alert = _alert_of(api, "p2")
    assert alert["status"] == "retracted"
    for action in ("acknowledge", "override", "snooze", "resolve", "reopen"):
        assert _act(api, alert["id"], action, alert["revision"], **_fields(action)).status_code == 409


def test_transition_input_errors(api):
    alert = _alert_of(api, "p3")
    aid, rev = alert["id"], alert["revision"]
    cases = [
        ({"action": "override", "revision": rev}, 400, "reason"),
        ({"action": "override", "revision": rev, "reason": "because"}, 400, "reason"),
        ({"action": "acknowledge", "revision": rev, "reason": "goals-of-care"}, 400, "reason"),
        ({"action": "snooze", "revision": rev}, 400, "until"),
        ({"action": "snooze", "revision": rev, "until": "2020-01-01T00:00:00Z"}, 400, "until"),
        ({"action": "snooze", "revision": rev, "until": (rq.utcnow() + timedelta(days=30)).isoformat()}, 400, "until"),
        ({"action": "snooze", "revision": rev, "until": "2030-01-01T00:00:00"}, 400, "until"),
        ({"action": "acknowledge", "revision": rev, "until": "2030-01-01T00:00:00Z"}, 400, "until"),
        ({"action": "explode", "revision": rev}, 400, "action"),
        ({"action": "acknowledge", "revision": rev, "extra": 1}, 400, "extra"),
        ({"action": "acknowledge"}, 428, "revision"),
    ]
    for body, status, field in cases:
        response = api.post(f"/api/review/alerts/{aid}/transitions", json=body, headers=PHARMACIST)
        assert response.status_code == status, (body, response.text)
        issue = response.json()["issue"][0]
        assert field in json.dumps(issue), (body, issue)
    assert api.get(f"/api/review/alerts/{aid}", headers=PHARMACIST).json()["revision"] == rev  # nothing changed
    missing = api.post(
        "/api/review/alerts/nope/transitions", json={"action": "acknowledge", "revision": 1}, headers=PHARMACIST
    )
    assert missing.status_code == 404


def test_if_match_header_carries_the_revision(api):
    alert = _alert_of(api, "p3")
    url = f"/api/review/alerts/{alert['id']}/transitions"
    stale = api.post(
        url, json={"action": "acknowledge"}, headers={**PHARMACIST, "If-Match": f'"{alert["revision"] - 1}"'}
    )
    assert stale.status_code == 409
    ok = api.post(url, json={"action": "acknowledge"}, headers={**PHARMACIST, "If-Match": f'W/"{alert["revision"]}"'})
    assert ok.status_code == 200 and ok.json()["status"] == "acknowledged"
    both = api.post(url, json={"action": "reopen", "revision": 1}, headers={**PHARMACIST, "If-Match": '"2"'})
    assert both.status_code == 400


def test_idempotency_key_makes_a_retry_harmless(api):
    alert = _alert_of(api, "p3")
    url = f"/api/review/alerts/{alert['id']}/transitions"
    headers = {**PHARMACIST, "Idempotency-Key": "retry-1"}
    body = {"action": "override", "revision": alert["revision"], "reason": "goals-of-care"}
    first = api.post(url, json=body, headers=headers)
    again = api.post(url, json=body, headers=headers)  # the client never saw the first answer
    assert first.status_code == again.status_code == 200
    assert again.json()["revision"] == first.json()["revision"]
    assert [h["action"] for h in again.json()["history"]].count("override") == 1


def test_concurrent_edits_conflict_instead_of_overwriting(api):
    alert = _alert_of(api, "p4")
    seen = alert["revision"]
    first = _act(api, alert["id"], "acknowledge", seen, headers=PHARMACIST)
    assert first.status_code == 200
    second = _act(api, alert["id"], "override", seen, headers=BOB, reason="goals-of-care")
    assert second.status_code == 409
    problem = second.json()["issue"][0]
    assert problem["code"] == "conflict" and "reload" in problem["diagnostics"]
    after = api.get(f"/api/review/alerts/{alert['id']}", headers=PHARMACIST).json()
    assert after["status"] == "acknowledged"
    assert [h["by"] for h in after["history"] if h["by"] != "system"] == ["user:alice"]


def test_snooze_ends_when_its_time_passes(api, monkeypatch):
    alert = _alert_of(api, "p5")
    until = rq.utcnow() + timedelta(hours=1)
    response = _act(api, alert["id"], "snooze", alert["revision"], until=until.isoformat())
    assert response.json()["status"] == "snoozed" and response.json()["snoozed_until"]
    assert "p5" not in [a["patient"] for a in _list(api)["items"]]
    assert [a["patient"] for a in _list(api, status="snoozed")["items"]] == ["p5"]
    later = until + timedelta(minutes=1)
    monkeypatch.setattr(rq, "utcnow", lambda: later)
    assert "p5" in [a["patient"] for a in _list(api)["items"]]
    assert _list(api)["counts"]["snoozed"] == 0
    detail = api.get(f"/api/review/alerts/{alert['id']}", headers=PHARMACIST).json()
    assert detail["status"] == "active"
    assert _act(api, alert["id"], "acknowledge", detail["revision"]).status_code == 200


def test_only_escalation_ends_a_snooze(store, api):
    alert = _alert_of(api, "p5")
    until = (rq.utcnow() + timedelta(hours=4)).isoformat()
    assert _act(api, alert["id"], "snooze", alert["revision"], until=until).status_code == 200
    seed(store, [potassium("k-p5-2", "p5", 3.0, T0 + timedelta(hours=8))])  # same severity: still snoozed
    detail = api.get(f"/api/review/alerts/{alert['id']}", headers=PHARMACIST).json()
    assert detail["status"] == "snoozed"
    assert detail["history"][-1]["action"] == "updated"
    seed(store, [potassium("k-p5-3", "p5", 2.7, T0 + timedelta(hours=9))])  # below 3.0: escalates
    detail = api.get(f"/api/review/alerts/{alert['id']}", headers=PHARMACIST).json()
    assert detail["status"] == "active"
    assert detail["history"][-1]["action"] == "escalated"
    assert "p5" in [a["patient"] for a in _list(api)["items"]]


def test_automatic_resolution_shows_as_a_system_transition(store, api):
    from itest_builders import magnesium

    alert = _alert_of(api, "p3")
    seed(store, [magnesium("mg-p3", "p3", 0.8, T0 + timedelta(hours=5))])
    detail = api.get(f"/api/review/alerts/{alert['id']}", headers=PHARMACIST).json()
    assert detail["status"] == "resolved"
    assert (detail["history"][-1]["action"], detail["history"][-1]["by"]) == ("resolved", "system")
    assert [a["patient"] for a in _list(api, status="resolved")["items"]] == ["p3"]


def test_cds_feedback_transitions_show_in_the_worklist(store, api):
    alert = _alert_of(api, "p2")
    store.transition(
        alert["id"],
        "accept",
        "ehr:https://ehr.test|dr-who",
        rq.utcnow(),
        accepted_suggestions=["x"],
        source="cds-hooks",
    )
    detail = api.get(f"/api/review/alerts/{alert['id']}", headers=PHARMACIST).json()
    assert detail["status"] == "accepted"
    assert detail["history"][-1]["by"] == "ehr:https://ehr.test|dr-who"
    assert [a["patient"] for a in _list(api, status="accepted")["items"]] == ["p2"]


# --- access control -------------------------------------------------------------------------------------------


def test_roles(api):
    alert = _alert_of(api, "p2")
    url = f"/api/review/alerts/{alert['id']}"
    for path in ("/api/review/alerts", url, "/api/review/analytics", "/api/review/audit?from=2024-01-01&to=2025-01-01"):
        assert api.get(path).status_code == 401, path
    assert api.post(f"{url}/transitions", json={"action": "acknowledge", "revision": 1}).status_code == 401
    assert api.get(url, headers=VIEWER).status_code == 200
    viewer_act = _act(api, alert["id"], "acknowledge", alert["revision"], headers=VIEWER)
    assert viewer_act.status_code == 403
    assert api.get("/api/review/analytics", headers=PHARMACIST).status_code == 403
    assert api.get("/api/review/audit?from=2024-01-01&to=2025-01-01", headers=VIEWER).status_code == 403
    assert api.get("/api/review/analytics", headers=ADMIN).status_code == 200
    assert api.get(url, headers=VIEWER).json()["revision"] == alert["revision"]


# --- analytics and audit ----------------------------------------------------------------------------------------


def test_analytics_on_a_known_data_set(api, monkeypatch):
    """6 alerts on 7 patients. Hypokalemia (5): p1 overridden 30 min after opening (mg-already-ordered), p2
    acknowledged after 1 h (seen, nothing decided: not acceptance), p3 overridden after 4 h (goals-of-care), p4
    snoozed after 2 h then overridden (mg-already-ordered), p5 untouched. Refractory (1, raised at T0):
    accepted by a pharmacist after 6 h. With "now" 30 h after T0 the untouched one is ignored; 10 h after T0
    it is pending (window 24 h)."""

    def at(moment):
        monkeypatch.setattr(rq, "utcnow", lambda: moment)

    def do(patient, action, after, **fields):
        alert = _alert_of(api, patient)
        at(datetime.fromisoformat(alert["opened_at"].replace("Z", "+00:00")) + after)
        response = _act(api, alert["id"], action, alert["revision"], **fields)
        assert response.status_code == 200, response.text

    do("p1", "override", timedelta(minutes=30), reason="mg-already-ordered")
    do("p2", "acknowledge", timedelta(hours=1))
    do("p3", "override", timedelta(hours=4), reason="goals-of-care")
    do("p4", "snooze", timedelta(hours=2), until=(T0 + timedelta(hours=10)).isoformat())  # p4 opened at T0+3h
    do("p4", "override", timedelta(hours=3), reason="mg-already-ordered")
    refractory_alert = _alert_of(api, "p1", REFRACTORY)
    at(T0 + timedelta(hours=6))
    assert _act(api, refractory_alert["id"], "accept", refractory_alert["revision"]).status_code == 200
    at(T0 + timedelta(hours=30))
    body = api.get("/api/review/analytics", headers=ADMIN).json()
    assert body["patients_seen"] == 7
    figures = {r["rule_id"]: r for r in body["rules"]}
    hypok = figures[HYPOK]
    assert hypok["fired"] == 5
    assert hypok["per_1000_patients"] == round(5000 / 7, 2)
    outcomes = ("accepted", "overridden", "acknowledged", "resolved_by_hand", "ignored", "pending")
    assert tuple(hypok[o] for o in outcomes) == (0, 3, 1, 0, 1, 0)
    assert (hypok["acknowledged_rate"], hypok["overridden_rate"], hypok["ignored_rate"]) == (0.2, 0.6, 0.2)
    assert hypok["override_reasons"] == {"goals-of-care": 1, "mg-already-ordered": 2}
    assert hypok["override_reason_names"]["mg-already-ordered"] == "Magnesium already ordered"
    assert hypok["median_seconds_to_first_action"] == 1.5 * 3600  # 0.5 h, 1 h, 2 h (the snooze), 4 h
    assert hypok["alerts_with_action"] == 4
    refractory = figures[REFRACTORY]
    assert (refractory["fired"], refractory["accepted"], refractory["median_seconds_to_first_action"]) == (
        1,
        1,
        6 * 3600,
    )
    assert refractory["per_1000_patients"] == round(1000 / 7, 2)
    at(T0 + timedelta(hours=10))
    early = {r["rule_id"]: r for r in api.get("/api/review/analytics", headers=ADMIN).json()["rules"]}
    assert (early[HYPOK]["pending"], early[HYPOK]["ignored"]) == (1, 0)  # p5 raised at T0+4h
    only_late = api.get("/api/review/analytics", params={"opened_from": "2024-04-01T08:30:00Z"}, headers=ADMIN)
    assert {r["rule_id"]: r["fired"] for r in only_late.json()["rules"]} == {HYPOK: 2}  # p4, p5 raised after 08:30


def test_audit_export_csv_and_ndjson(api, monkeypatch):
    monkeypatch.setattr(rq, "utcnow", lambda: datetime(2024, 4, 2, 12, 0, tzinfo=T0.tzinfo))
    alert = _alert_of(api, "p2")
    _act(api, alert["id"], "override", alert["revision"], reason="goals-of-care", comment="=HYPERLINK(1)")
    params = {"from": "2024-04-01T00:00:00Z", "to": "2024-04-03T00:00:00Z"}
    response = api.get("/api/review/audit", params={**params, "format": "ndjson"}, headers=ADMIN)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in response.text.splitlines()]
    # p1's hypokalemia alert opened on 31 March (its first K), then updated at T0 by the second K
    assert sorted(r["action"] for r in rows) == ["opened"] * 5 + ["override", "updated"]
    override = next(r for r in rows if r["action"] == "override")
    assert (override["by"], override["reason"], override["patient"]) == ("user:alice", "goals-of-care", "p2")
    assert (override["from"], override["to"]) == ("active", "overridden")
    csv_response = api.get("/api/review/audit", params=params, headers=ADMIN)
    assert csv_response.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv_response.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(csv_response.text)))
    assert len(table) == 7 and table[0].keys() >= {"at", "alert_id", "action", "by", "reason", "comment"}
    assert next(r for r in table if r["action"] == "override")["comment"] == "'=HYPERLINK(1)"  # no formula injection
    narrow = api.get(
        "/api/review/audit",
        params={"from": "2024-04-02T00:00:00Z", "to": "2024-04-03T00:00:00Z", "format": "ndjson"},
        headers=ADMIN,
    )
    assert [json.loads(line)["action"] for line in narrow.text.splitlines()] == ["override"]
    bad = api.get(
        "/api/review/audit", params={"from": "2024-04-03T00:00:00Z", "to": "2024-04-01T00:00:00Z"}, headers=ADMIN
    )
    assert bad.status_code == 400


# --- lifecycle statuses, escalation ------------------------------------------------------------------------------


def test_every_documented_status_filters_on_both_apis(store, api):
    p2, p3, p4 = (_alert_of(api, p) for p in ("p2", "p3", "p4"))
    assert _act(api, p2["id"], "accept", p2["revision"]).status_code == 200
    close(store, p3["id"], "expired", "potassium result aged out of the 72 h look-back")
    close(store, p4["id"], "withdrawn", "potassium corrected to 3.9 mmol/L")
    expected = {"accepted": ["p2"], "expired": ["p3"], "withdrawn": ["p4"], "closed": ["p3", "p4"]}
    for status, patients in expected.items():
        assert sorted(a["patient"] for a in _list(api, status=status)["items"]) == patients, status
    counts = _list(api)["counts"]
    assert (counts["todo"], counts["open"], counts["closed"], counts["all"]) == (3, 4, 2, 6)
    assert (counts["expired"], counts["withdrawn"], counts["accepted"]) == (1, 1, 1)
    for status in ("accepted", "expired", "withdrawn", "overridden"):  # the hospital-wide read API too
        response = api.get("/alerts", params={"status": status}, headers=VIEWER)
        assert response.status_code == 200, (status, response.text)
    accepted = api.get("/alerts", params={"status": "accepted"}, headers=VIEWER).json()["alerts"]
    assert [a["patient"] for a in accepted] == ["p2"]
    expired = api.get(f"/api/review/alerts/{p3['id']}", headers=PHARMACIST).json()
    for action in ("acknowledge", "override", "snooze", "resolve", "reopen"):  # closed by the pipeline: final
        assert _act(api, p3["id"], action, expired["revision"], **_fields(action)).status_code == 409


def test_escalated_alerts_go_on_top_with_why_until_someone_acts(store, api):
    p5 = _alert_of(api, "p5")  # info, raised last: the bottom of the list
    assert _act(api, p5["id"], "override", p5["revision"], reason="goals-of-care").status_code == 200
    assert "p5" not in [a["patient"] for a in _list(api)["items"]]
    escalate(store, p5["id"], "potassium fell to 2.7 mmol/L (below 3.0)", severity="warning")
    rows = _list(api)["items"]
    assert rows[0]["patient"] == "p5" and rows[0]["status"] == "active"
    escalated = rows[0]["escalated"]
    assert (escalated["why"], escalated["from"]) == ("potassium fell to 2.7 mmol/L (below 3.0)", "overridden")
    assert _list(api, severity="warning")["items"][0]["patient"] == "p5"
    grouped = api.get("/api/review/patients", headers=PHARMACIST).json()["groups"]
    assert grouped[0]["patient"] == "p5"
    detail = api.get(f"/api/review/alerts/{p5['id']}", headers=PHARMACIST).json()
    assert detail["history"][-1]["action"] == "escalated"
    assert _act(api, p5["id"], "acknowledge", detail["revision"]).status_code == 200
    rows = _list(api)["items"]
    assert rows[0]["patient"] != "p5" and next(a for a in rows if a["patient"] == "p5")["escalated"] is None


# --- grouping, polling, bulk ----------------------------------------------------------------------------------------


def test_patients_endpoint_groups_and_pages_by_patient(api):
    body = api.get("/api/review/patients", headers=PHARMACIST).json()
    assert [g["patient"] for g in body["groups"]] == ["p1", "p4", "p2", "p3", "p5"]  # by each one's top alert
    p1 = body["groups"][0]
    assert sorted(a["rule_id"] for a in p1["alerts"]) == [HYPOK, REFRACTORY] and p1["latest"]["potassium"]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/api/review/patients", params=params, headers=PHARMACIST).json()
        seen += [g["patient"] for g in page["groups"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ["p1", "p4", "p2", "p3", "p5"]  # each patient once, in order
    alerts_cursor = _list(api, limit=2)["next_cursor"]
    wrong = api.get("/api/review/patients", params={"cursor": alerts_cursor, "limit": 2}, headers=PHARMACIST)
    assert wrong.status_code == 400  # a cursor of the ungrouped list is not one of this list


def test_updates_count_new_and_escalated_alerts_since_a_time(store, api):
    since = rq.utcnow().timestamp()
    assert api.get("/api/review/updates", params={"since": since}, headers=VIEWER).json()["count"] == 0
    seed(store, [potassium("k-p6-2", "p6", 3.2, T0 + timedelta(hours=9))])  # a new alert for p6
    p3 = _alert_of(api, "p3")
    _act(api, p3["id"], "override", p3["revision"], reason="goals-of-care")
    escalate(store, p3["id"], "potassium below 3.0")
    body = api.get("/api/review/updates", params={"since": since}, headers=VIEWER).json()
    new_id = _alert_of(api, "p6")["id"]
    assert (body["new"], body["escalated"], body["count"]) == ([new_id], [p3["id"]], 2)
    assert body["now"] >= since
    only_rule = api.get("/api/review/updates", params={"since": since, "rule": REFRACTORY}, headers=VIEWER).json()
    assert only_rule["count"] == 0
    assert api.get("/api/review/updates", params={"since": body["now"]}, headers=VIEWER).json()["count"] == 0
    assert api.get("/api/review/updates", params={"since": since}).status_code == 401


def test_bulk_acknowledge_for_a_patient_refuses_stale_ones_individually(api):
    hypok, refractory = _alert_of(api, "p1"), _alert_of(api, "p1", REFRACTORY)
    assert _act(api, refractory["id"], "snooze", refractory["revision"], **_fields("snooze")).status_code == 200
    body = {"alerts": {hypok["id"]: hypok["revision"], refractory["id"]: refractory["revision"]}, "comment": "seen"}
    results = api.post("/api/review/patients/p1/acknowledge", json=body, headers=BOB).json()
    by_id = {r["id"]: r for r in results}
    assert by_id[hypok["id"]]["status"] == 200 and by_id[refractory["id"]]["status"] == 409
    after = api.get(f"/api/review/alerts/{hypok['id']}", headers=BOB).json()
    assert (after["status"], after["history"][-1]["by"], after["history"][-1]["comment"]) == (
        "acknowledged",
        "user:bob",
        "seen",
    )
    other = api.post("/api/review/patients/p2/acknowledge", json={"alerts": {hypok["id"]: 1}}, headers=BOB).json()
    assert other[0]["status"] == 404  # an alert of another patient
    assert api.post("/api/review/patients/p1/acknowledge", json=body, headers=VIEWER).status_code == 403


# --- patient context and display times -----------------------------------------------------------------------------


def test_patient_context_search_and_filters(api):
    assert _list(api)["items"][0]["patient_context"] is None  # no patient context yet: null, id shown
    with directory(ward_directory()):
        rows = _list(api)["items"]
        p1 = next(a for a in rows if a["patient"] == "p1")["patient_context"]
        assert (p1["name"], p1["mrn"], p1["sex"], p1["ward"], p1["bed"], p1["encounter_class"]) == (
            "DOE, Jane", "MRN1001", "female", "Ward 5B", "1", "IMP",
        )  # fmt: skip
        assert p1["age"].endswith(" y") and p1["encounter_class_display"] == "Inpatient"
        assert {a["patient"] for a in _list(api, patient="MRN1003")["items"]} == {"p3"}
        assert {a["patient"] for a in _list(api, patient="jane")["items"]} == {"p1"}
        assert {a["patient"] for a in _list(api, patient="p4")["items"]} == {"p4"}  # the FHIR id still works
        assert {a["patient"] for a in _list(api, ward="ED")["items"]} == {"p5"}
        assert {a["patient"] for a in _list(api, ward="Ward 5B", encounter_class="IMP")["items"]} == {
            "p1", "p2", "p3", "p4"
        }  # fmt: skip
        assert _list(api, patient="nobody")["items"] == []
        grouped = api.get("/api/review/patients", params={"ward": "ED"}, headers=PHARMACIST).json()["groups"]
        assert [g["patient_context"]["name"] for g in grouped] == ["LOW, Karl"]


def test_display_fields_are_local_time_and_age_counts_from_raising(api, monkeypatch):
    from config.settings import get_settings

    monkeypatch.setenv("EHR_ALERTS_DISPLAY_TIMEZONE", "Europe/Berlin")
    get_settings.cache_clear()
    monkeypatch.setattr(rq, "utcnow", lambda: T0 + timedelta(hours=5, minutes=30))
    p2 = next(a for a in _list(api)["items"] if a["patient"] == "p2")  # raised at T0+1h = 07:00Z = 09:00 CEST
    assert p2["raised_at"].startswith("2024-04-01T07:00:00")  # machine fields stay UTC
    assert p2["display"] == {
        "timezone": "Europe/Berlin",
        "raised_at": "01 Apr 2024 09:00 CEST",
        "opened_at": "01 Apr 2024 09:00 CEST",
        "age": "4 h 30 min",
        "snoozed_until": None,
    }
    detail = api.get(f"/api/review/alerts/{p2['id']}", headers=PHARMACIST).json()
    assert detail["readable"]["evidence"][0]["time"] == "01 Apr 2024 09:00 CEST"


def test_detail_reads_in_clinical_words(api):
    detail = _alert_of(api, "p1", REFRACTORY)
    readable = detail["readable"]
    assert readable["why"] and not any("[Moles/volume]" in line for line in readable["why"])
    assert not any("T" in w and "Z" in w for line in readable["why"] for w in line.split() if w[:4].isdigit())
    refs = [row["reference"] for row in readable["evidence"]]
    assert len(refs) == len(set(refs))  # K 2.8 is both "low" and "latest" in the rule: one row
    assert not any(row["test"] in ("low_potassium", "latest_potassium") for row in readable["evidence"])
    assert [m["drug"] for m in readable["medications"]] and readable["medications"][0]["class"] == "Loop diuretic"


# --- CDS Hooks alerts everywhere ---------------------------------------------------------------------------------


def test_an_alert_raised_and_overridden_in_the_ehr_shows_in_worklist_audit_and_analytics(store, api):
    at = T0 + timedelta(hours=7)
    alert_id = cds_only_alert(store, "p6", HYPOK, "overridden", at)
    row = _list(api, status="overridden")["items"][0]
    assert (row["id"], row["source"], row["patient"]) == (alert_id, "cds-hooks", "p6")
    detail = api.get(f"/api/review/alerts/{alert_id}", headers=PHARMACIST).json()
    assert detail["history"][-1]["by"] == "ehr:https://ehr.test|dr-who"
    audit = api.get(
        "/api/review/audit",
        params={"from": "2024-04-01T00:00:00Z", "to": "2024-04-02T00:00:00Z", "format": "ndjson"},
        headers=ADMIN,
    )
    rows = [json.loads(line) for line in audit.text.splitlines()]
    ehr = [r for r in rows if r["alert_id"] == alert_id and r["action"] == "override"]
    assert ehr and (ehr[0]["source"], ehr[0]["reason"]) == ("cds-hooks", "goals-of-care")
    figures = {r["rule_id"]: r for r in api.get("/api/review/analytics", headers=ADMIN).json()["rules"]}
    assert figures[HYPOK]["raised_by_cds_hooks"] == 1 and figures[HYPOK]["acted_on_in_ehr"] == 1
    assert figures[HYPOK]["overridden"] == 1 and figures[HYPOK]["fired"] == 6


# --- data problems -------------------------------------------------------------------------------------------------


def test_data_problems_queue_records_once_lists_resolves_and_audits(store, api, monkeypatch):
    from workers.state.data_problems import DataProblem, DataProblems

    queue = DataProblems(store.client)
    problem = {
        "patient": "p3", "reason": "unit-contradicts-code", "detail": "unit mg/dL contradicts the molar code 2823-3",
        "resources": ["Observation/k-p3-x/_history/1"], "as_of": "2024-04-01T08:00:00Z", "rule_id": HYPOK,
        "concept": "potassium", "reported": "4.0 mg/dL",
    }  # fmt: skip
    at = datetime(2024, 4, 2, 9, 0, tzinfo=T0.tzinfo)
    assert queue.record(problem, now=at) is True
    assert queue.record({**problem, "rule_id": REFRACTORY, "as_of": "2024-04-01T09:00:00Z"}, now=at) is False
    queue.record(DataProblem(**{**problem, "reason": "future-date", "detail": "dated 2204-01-01"}), now=at)
    body = api.get("/api/review/data-problems", headers=VIEWER).json()
    assert body["counts"] == {"open": 2, "resolved": 0, "all": 2}
    item = next(i for i in body["items"] if i["reason"] == "unit-contradicts-code")
    assert (item["occurrences"], item["rules"], item["as_of"]) == (
        2,
        sorted([HYPOK, REFRACTORY]),
        "2024-04-01T09:00:00Z",
    )
    assert item["reason_display"] == "Unit contradicts the test code" and item["advice"]
    only = api.get("/api/review/data-problems", params={"reason": "future-date"}, headers=VIEWER).json()["items"]
    assert [i["reason"] for i in only] == ["future-date"]
    assert api.get("/api/review/data-problems", params={"reason": "nope"}, headers=VIEWER).status_code == 400
    url = f"/api/review/data-problems/{item['id']}/transitions"
    assert api.post(url, json={"action": "resolve", "revision": 1, "comment": "x"}, headers=VIEWER).status_code == 403
    no_note = api.post(url, json={"action": "resolve", "revision": 1}, headers=PHARMACIST)
    assert no_note.status_code == 400 and no_note.json()["issue"][0]["expression"] == ["comment"]
    assert api.post(url, json={"action": "resolve", "comment": "x"}, headers=PHARMACIST).status_code == 428
    stale = api.post(url, json={"action": "resolve", "revision": 0, "comment": "x"}, headers=PHARMACIST)
    assert stale.status_code == 409
    monkeypatch.setattr(rq, "utcnow", lambda: at + timedelta(hours=1))
    done = api.post(url, json={"action": "resolve", "revision": 1, "comment": "LIS code fixed"}, headers=PHARMACIST)
    assert done.status_code == 200 and (done.json()["status"], done.json()["resolved_by"]) == ("resolved", "user:alice")
    again = api.post(url, json={"action": "resolve", "revision": 2, "comment": "x"}, headers=PHARMACIST)
    assert again.status_code == 409
    queue.record(problem, now=at + timedelta(hours=2))  # seen again: counted, still resolved
    resolved = api.get("/api/review/data-problems", params={"status": "resolved"}, headers=VIEWER).json()["items"]
    assert [(i["id"], i["occurrences"]) for i in resolved] == [(item["id"], 3)]
    audit = api.get(
        "/api/review/audit",
        params={"from": "2024-04-02T00:00:00Z", "to": "2024-04-03T00:00:00Z", "format": "ndjson"},
        headers=ADMIN,
    )
    rows = [json.loads(line) for line in audit.text.splitlines() if '"data-problem"' in line]
    assert sorted(r["action"] for r in rows) == ["recorded", "recorded", "resolve"]
    resolve = next(r for r in rows if r["action"] == "resolve")
    assert (resolve["by"], resolve["comment"], resolve["record_id"], resolve["patient"]) == (
        "user:alice", "LIS code fixed", item["id"], "p3",
    )  # fmt: skip
    reopened = api.post(url, json={"action": "reopen", "revision": 2}, headers=PHARMACIST)
    assert reopened.status_code == 200 and reopened.json()["status"] == "open"
    assert (
        api.post("/api/review/data-problems/zzz/transitions", json={"action": "reopen"}, headers=PHARMACIST).status_code
        == 400
    )


# --- patient context from ingested Patient / Encounter resources (issue 11): the directory the API installs ---------
# Patient and Encounter resources go through ingestion and the pipeline like every other resource; the worklist shows
# who and where the patient is from them, searches names and MRNs, filters by ward and encounter class; a discharge
# closes the inpatient-only alert; a deleted Patient leaves the worklist; no PHI reaches the logs.

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


def _time(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


def person(pid: str, family: str, given: str, mrn: str, born: str = "1948-05-17") -> dict[str, Any]:
    return {
        "resourceType": "Patient", "id": pid, "gender": "female", "birthDate": born,
        "name": [{"use": "official", "family": family, "given": [given]}],
        "identifier": [{"type": MR, "system": "urn:oid:1.2.3", "value": mrn}],
    }  # fmt: skip


def stay(eid: str, pid: str, klass: str, start: float, end: float | None = None, ward: str | None = None,
         bed: str | None = None, version: str = "1") -> dict[str, Any]:  # fmt: skip
    resource: dict[str, Any] = {
        "resourceType": "Encounter", "id": eid, "meta": {"versionId": version},
        "status": "finished" if end is not None else "in-progress",
        "class": {"system": ACT, "code": klass}, "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": _time(start), **({"end": _time(end)} if end is not None else {})},
    }  # fmt: skip
    places = [(ward, "wa"), (bed, "bd")]
    resource["location"] = [
        {"location": {"display": name}, "physicalType": {"coding": [{"code": kind}]}} for name, kind in places if name
    ]
    return resource


@pytest.fixture
def context_api(store, module_redis_url, key_prefix, monkeypatch, tmp_path):
    seed(
        store,
        [
            person("c1", "Doe", "Jane", "MRN-C1"),
            stay("e1", "c1", "IMP", -30, ward="Ward 7 East", bed="12"),
            potassium("k-c1", "c1", 3.1, T0),
            person("c2", "Roe", "Anna", "MRN-C2", born="1960-01-02"),
            stay("e2", "c2", "EMER", -2, ward="ED"),
            potassium("k-c2", "c2", 3.2, T0 + timedelta(hours=1)),
            person("c3", "Poe", "Edgar", "MRN-C3"),
            stay("e3", "c3", "AMB", 1.5),
            potassium("k-c3", "c3", 3.3, T0 + timedelta(hours=2)),  # an outpatient: no alert
            potassium("k-c4", "c4", 3.0, T0 + timedelta(hours=3)),  # no context at all: alert, FHIR id shown
        ],
    )
    with review_client(monkeypatch, module_redis_url, key_prefix, tmp_path) as client:
        yield client


def _items(api, **params):
    return _list(api, **params)["items"]


def test_the_api_installs_the_stored_directory():
    import service.app  # noqa: F401 - importing the app installs it

    assert isinstance(directory_seam.directory(), directory_seam.StoredPatientDirectory)


def test_the_worklist_shows_who_and_where_from_ingested_context(context_api):
    rows = {a["patient"]: a for a in _items(context_api)}
    assert set(rows) == {"c1", "c2", "c4"}  # c3 is an outpatient: the hypokalemia rule does not apply
    c1 = rows["c1"]["patient_context"]
    assert (c1["name"], c1["mrn"], c1["sex"], c1["birth_date"]) == ("DOE, Jane", "MRN-C1", "female", "1948-05-17")
    assert (c1["ward"], c1["bed"], c1["encounter_class"], c1["encounter_class_display"]) == (
        "Ward 7 East", "12", "IMP", "Inpatient",
    )  # fmt: skip
    assert c1["age"].endswith(" y")
    assert rows["c2"]["patient_context"]["ward"] == "ED" and rows["c2"]["patient_context"]["encounter_class"] == "EMER"
    assert rows["c4"]["patient_context"] is None  # no Patient / Encounter sent: the FHIR id is shown


def test_search_and_filters_read_the_stored_context(context_api):
    assert {a["patient"] for a in _items(context_api, patient="MRN-C2")} == {"c2"}
    assert {a["patient"] for a in _items(context_api, patient="doe")} == {"c1"}
    assert {a["patient"] for a in _items(context_api, ward="Ward 7 East")} == {"c1"}
    assert {a["patient"] for a in _items(context_api, encounter_class="EMER")} == {"c2"}
    assert directory_seam.directory().wards() == ["ED", "Ward 7 East"]  # c3's clinic visit has no ward
    assert directory_seam.directory().available


def test_a_discharge_closes_the_inpatient_alert_and_updates_the_worklist(context_api, store):
    seed(store, [stay("e1", "c1", "IMP", -30, end=2, version="2")])
    [alert] = [a for a in store.alerts_for_patient("c1") if a["rule_id"] == HYPOK]
    assert alert["status"] == "withdrawn"
    assert "Does not apply: no encounter in progress" in alert["history"][-1]["why"]
    entry = ContextIndex(store.client).get_many(["c1"])["c1"]
    assert "ward" not in entry and entry["name"] == "DOE, Jane"


def test_a_deleted_patient_leaves_the_worklist_context(context_api, store):
    from workers.events import dump_batch, tombstone
    from workers.pipeline import process_batch

    process_batch(dump_batch([tombstone("c2", "Patient/c2", T0 + timedelta(hours=5))]), store)
    entry = ContextIndex(store.client).get_many(["c2"])["c2"]
    assert "name" not in entry and entry["ward"] == "ED"  # the encounter is still known


def test_no_name_or_mrn_reaches_the_logs(store, caplog):
    caplog.set_level(logging.DEBUG)
    seed(store, [person("c9", "Secretname", "Hidden", "MRN-SECRET"), stay("e9", "c9", "IMP", 0),
                 potassium("k-c9", "c9", 3.0, T0 + timedelta(hours=1))])  # fmt: skip
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for secret in ("Secretname", "Hidden", "MRN-SECRET", "1948-05-17"):
        assert secret not in text
