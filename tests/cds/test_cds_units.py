"""Unit tests of the CDS Hooks pieces: prefetch reading, templates and windows, request validation, card
finishing and merging, feedback parsing. The HTTP behaviour is in tests/integration/test_cds_hooks.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
import pytest
from cds_support import HYPOK, REFRACTORY, draft_kcl, hook_request, prefetch_for, queries, scenario

from config.settings import Settings
from rules.engine import evaluate
from service.cds.cardindex import CardIndex
from service.cds.cards import build_cards, finish_card, strip_empty, suggestion_uuid
from service.cds.errors import CdsError
from service.cds.feedback import parse_feedback
from service.cds.orders import NormalizeCache, draft_order_facts, facts_from
from service.cds.prefetch import read_key
from service.cds.request import parse_request
from service.cds.services import prefetch_queries, substitute
from workers.pipeline import get_catalog

NOW = datetime.now(UTC)


# --- prefetch: absent, null, Bundle, paginated, OperationOutcome, single resource ---------------------------


def test_prefetch_absent_key_is_missing() -> None:
    assert read_key("k", False, None).state == "missing"


def test_prefetch_null_is_complete_and_empty() -> None:
    item = read_key("k", True, None)
    assert (item.state, item.resources) == ("complete", [])


def test_prefetch_bundle_is_complete_with_its_resources_and_nested_bundles() -> None:
    inner = {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Observation", "id": "b"}}]}
    bundle = {
        "resourceType": "Bundle",
        "entry": [{"resource": {"resourceType": "Observation", "id": "a"}}, {"resource": inner}],
    }
    item = read_key("k", True, bundle)
    assert item.state == "complete" and [r["id"] for r in item.resources] == ["a", "b"]


def test_prefetch_bundle_with_next_link_is_continued() -> None:
    bundle = {"resourceType": "Bundle", "link": [{"relation": "next", "url": "https://x/fhir/Observation?p=2"}]}
    item = read_key("k", True, bundle)
    assert (item.state, item.next_url) == ("continued", "https://x/fhir/Observation?p=2")


@pytest.mark.parametrize("severity", ["error", "fatal"])
def test_prefetch_bundle_with_failed_outcome_entry_is_missing(severity: str) -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": "exception"}]}
    assert read_key("k", True, {"resourceType": "Bundle", "entry": [{"resource": outcome}]}).state == "missing"


def test_prefetch_bundle_with_warning_outcome_entry_is_complete() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "informational"}]}
    item = read_key("k", True, {"resourceType": "Bundle", "entry": [{"resource": outcome}]})
    assert (item.state, item.resources) == ("complete", [])


@pytest.mark.parametrize(
    "value", [{"resourceType": "OperationOutcome", "issue": []}, "text", [1], {"no": "type"}, {"resourceType": 3}]
)
def test_prefetch_outcome_or_garbage_is_missing(value: Any) -> None:
    assert read_key("k", True, value).state == "missing"


def test_prefetch_single_resource_is_complete() -> None:
    item = read_key("k", True, {"resourceType": "Observation", "id": "x"})
    assert item.state == "complete" and item.resources[0]["id"] == "x"


# --- templates and windows ------------------------------------------------------------------------------


def test_windows_come_from_the_rule_parameters() -> None:
    windows = {q.key: q.window_hours for q in queries()}
    assert windows["potassium"] == 72  # k_lookback / window
    assert windows["magnesium"] == 144  # 72 h before a K that is itself up to 72 h old
    assert windows["qtc"] == 72 and windows["ecg"] == 72
    assert windows["conditions"] is None and windows["medicationRequests"] is None


def test_windows_follow_a_changed_rule_parameter() -> None:
    rules = [r for r in get_catalog().rules if r.id == HYPOK]
    changed = rules[0].model_copy(deep=True)
    changed.parameters["mg_lookback"] = changed.parameters["mg_lookback"].model_copy(update={"hours": 24.0})
    windows = {q.key: q.window_hours for q in prefetch_queries([changed])}
    assert windows["magnesium"] == 72 + 24
    assert "qtc" not in windows and "ecg" not in windows  # only what that rule reads
    assert windows["conditions"] is None and windows["procedures"] == 168  # its renal inputs: dialysis


def test_own_search_applies_the_window_and_tokens() -> None:
    query = next(q for q in queries() if q.key == "magnesium")
    resource_type, params = query.own_search({"context.patientId": "p 1"}, datetime(2024, 5, 7, tzinfo=UTC), 50)
    assert resource_type == "Observation"
    assert ("patient", "p 1") in params and ("date", "ge2024-05-01T00:00:00Z") in params and ("_count", "50") in params


def test_substitute_replaces_tokens() -> None:
    assert (
        substitute(
            "Patient/{{context.patientId}}?u={{ userPractitionerId }}",
            {"context.patientId": "a", "userPractitionerId": "b"},
        )
        == "Patient/a?u=b"
    )


# --- request validation ---------------------------------------------------------------------------------


def test_request_tokens_include_the_user_token_for_the_user_type() -> None:
    call = parse_request(hook_request("patient-view", "p1", {}), "patient-view")
    assert call.tokens() == {
        "context.patientId": "p1",
        "context.userId": "Practitioner/example",
        "userPractitionerId": "example",
    }


def test_request_keeps_the_token_out_of_repr_and_errors() -> None:
    body = hook_request("patient-view", "p1", {}, fhir_server="https://ehr/fhir", token="SECRET-123")
    call = parse_request(body, "patient-view")
    assert call.access_token == "SECRET-123" and "SECRET-123" not in repr(call)
    body["fhirAuthorization"]["token_type"] = "MAC"
    with pytest.raises(CdsError) as caught:
        parse_request(body, "patient-view")
    assert "SECRET-123" not in caught.value.message


def test_request_ignores_unknown_members() -> None:
    body = hook_request("patient-view", "p1", {}, extension={"x": 1}, futureMember=[None])
    assert parse_request(body, "patient-view").patient_id == "p1"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda b: b.pop("hookInstance"), "hookInstance"),
        (lambda b: b.update(hookInstance="1234"), "hookInstance"),
        (lambda b: b.update(hook="order-sign"), "hook"),
        (lambda b: b.update(context=[]), "context"),
        (lambda b: b["context"].update(userId="Device/1"), "context.userId"),
        (lambda b: b["context"].update(patientId=""), "context.patientId"),
        (lambda b: b.update(prefetch=[]), "prefetch"),
        (lambda b: b.update(fhirServer="ftp://x"), "fhirServer"),
        (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer"}), "fhirServer"),
    ],
)
def test_request_errors_name_the_member(change: Any, where: str) -> None:
    body = hook_request("patient-view", "p1", {})
    change(body)
    with pytest.raises(CdsError) as caught:
        parse_request(body, "patient-view")
    assert caught.value.status == 400 and caught.value.expression == where


def test_order_select_selections_must_be_in_draft_orders() -> None:
    body = hook_request("order-select", "p1", {})
    assert parse_request(body, "order-select").selections == ["MedicationRequest/draft-kcl"]
    body["context"]["selections"] = []
    with pytest.raises(CdsError):
        parse_request(body, "order-select")


# --- facts, draft orders, cache ---------------------------------------------------------------------------


def test_draft_orders_become_order_facts() -> None:
    facts = draft_order_facts({"resourceType": "Bundle", "entry": [{"resource": draft_kcl("p1")}]}, "p1")
    assert {(f.concept, f.kind, f.counts) for f in facts} >= {("potassium-order", "order", True)}


def test_invalid_draft_order_is_left_out_not_raised() -> None:
    bad = {"resourceType": "MedicationRequest", "id": "draft\u2011rx", "status": "draft", "intent": "order"}
    assert draft_order_facts({"resourceType": "Bundle", "entry": [{"resource": bad}]}, "p1") == []


def test_other_patients_resources_are_left_out() -> None:
    facts = facts_from(scenario(HYPOK, "someone-else"), "p1", include_preliminary=False)
    assert facts == []


def test_normalize_cache_gives_the_same_facts_and_stays_bounded() -> None:
    cache = NormalizeCache(3)
    resources = scenario(REFRACTORY, "p1")
    plain = facts_from(resources, "p1", False)
    assert facts_from(resources, "p1", False, cache) == plain
    assert facts_from(resources, "p1", False, cache) == plain
    assert len(cache._items) == 3


# --- cards ----------------------------------------------------------------------------------------------


def test_strip_empty_removes_null_and_empty_members_recursively() -> None:
    value = {
        "a": None,
        "b": "",
        "c": [],
        "d": {},
        "e": [{"f": None}, "x", ""],
        "g": {"h": {"i": []}},
        "j": 0,
        "k": False,
    }
    assert strip_empty(value) == {"e": ["x"], "j": 0, "k": False}


def test_finish_card_sets_uuids_and_drops_invalid_suggestions() -> None:
    body = {
        "summary": "s",
        "indicator": "info",
        "source": {"label": "l", "topic": {}},
        "suggestions": [
            {
                "id": "good",
                "label": "ok",
                "actions": [
                    {
                        "type": "create",
                        "description": "d",
                        "resource": {
                            "resourceType": "ServiceRequest",
                            "status": "draft",
                            "intent": "proposal",
                            "subject": {"reference": "Patient/p"},
                        },
                    }
                ],
            },
            {
                "id": "bad",
                "label": "no",
                "actions": [
                    {
                        "type": "create",
                        "description": "d",
                        "resource": {"resourceType": "ServiceRequest", "status": "nonsense"},
                    }
                ],
            },
        ],
        "selectionBehavior": "at-most-one",
        "links": [],
    }
    card = finish_card(body, "card-1", "rule")
    assert card is not None and card["uuid"] == "card-1"
    assert [s["uuid"] for s in card["suggestions"]] == [suggestion_uuid("card-1", "good")]
    assert "id" not in card["suggestions"][0] and "links" not in card and card["source"] == {"label": "l"}
    body["suggestions"] = body["suggestions"][1:]
    card = finish_card(body, "card-1", "rule")
    assert card is not None and "suggestions" not in card and "selectionBehavior" not in card


def _decisions(resources: list[dict[str, Any]], patient: str) -> list[Any]:
    return evaluate(get_catalog().evaluated(), facts_from(resources, patient, False), NOW, patient)


def _index() -> CardIndex:
    return CardIndex(fakeredis.FakeRedis(decode_responses=True), Settings(key_prefix="unit"))


def test_request_only_episode_uuid_is_stable_and_ends_when_the_rule_stops_firing() -> None:
    index, patient = _index(), "p1"
    firing = _decisions(scenario(HYPOK, patient), patient)
    first = build_cards(firing, [], patient, index, NOW)
    assert build_cards(firing, [], patient, index, NOW)[0]["uuid"] == first[0]["uuid"]
    assert build_cards(_decisions(scenario(None, patient), patient), [], patient, index, NOW) == []
    assert build_cards(firing, [], patient, index, NOW)[0]["uuid"] != first[0]["uuid"]
    assert index.get(first[0]["uuid"])["rule_id"] == HYPOK  # kept for late feedback


def _stored(rule: str, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "rule_id": rule,
        "status": status,
        "opened_at": "2024-01-01",
        "card": None,
        **extra,
    }


@pytest.mark.parametrize(
    ("status", "extra", "shown"),
    [
        ("active", {}, True),
        ("acknowledged", {}, True),
        ("overridden", {}, False),
        ("accepted", {}, False),
        ("snoozed", {"snoozed_until": (NOW + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}, False),
        ("snoozed", {"snoozed_until": (NOW - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}, True),
    ],
)
def test_stored_alert_status_decides_whether_its_card_is_shown(status: str, extra: dict[str, Any], shown: bool) -> None:
    patient = "p1"
    alert = _stored(HYPOK, status, **extra)
    cards = build_cards(_decisions(scenario(HYPOK, patient), patient), [alert], patient, _index(), NOW)
    assert [c["uuid"] for c in cards] == ([alert["id"]] if shown else [])


def test_stored_alert_of_a_rule_that_does_not_fire_on_the_call_is_not_shown() -> None:
    patient = "p1"
    cards = build_cards(
        _decisions(scenario(None, patient), patient), [_stored(HYPOK, "active")], patient, _index(), NOW
    )
    assert cards == []


def test_rules_the_call_could_not_check_show_only_their_stored_alert_with_a_note() -> None:
    """A key the rule reads could not be had: the call's own decision for it is not trusted either way."""
    patient = "p1"
    card = {"summary": "stored", "detail": "As computed.", "indicator": "info", "source": {"label": "ehr-alerts"}}
    stored = _stored(HYPOK, "active", card=card)
    unchecked = {HYPOK: "*Not re-checked.*", REFRACTORY: "*Not re-checked.*"}
    quiet = _decisions(scenario(None, patient), patient)  # would clear the stored alert if trusted
    (shown,) = build_cards(quiet, [stored], patient, _index(), NOW, unchecked=unchecked)
    assert shown["uuid"] == stored["id"] and shown["detail"] == "As computed.\n\n*Not re-checked.*"
    assert card["detail"] == "As computed."  # the stored body is not changed
    firing = _decisions(scenario(HYPOK, patient), patient)  # would raise a new card if trusted
    assert build_cards(firing, [], patient, _index(), NOW, unchecked=unchecked) == []
    # A rule the gap does not touch is evaluated on the call's data as usual.
    assert len(build_cards(firing, [], patient, _index(), NOW, unchecked={REFRACTORY: "x"})) == 1


def test_draft_magnesium_lab_order_keeps_the_hypokalemia_card_away() -> None:
    patient = "p1"
    order = {
        "resourceType": "ServiceRequest",
        "id": "mg",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2601-3"}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    facts = facts_from(scenario(HYPOK, patient), patient, False)
    facts += draft_order_facts({"resourceType": "Bundle", "entry": [{"resource": order}]}, patient)
    decisions = evaluate(get_catalog().evaluated(), facts, NOW, patient)
    assert build_cards(decisions, [], patient, _index(), NOW) == []


# --- feedback -------------------------------------------------------------------------------------------


def test_feedback_parse_and_idempotency_key() -> None:
    body = {
        "feedback": [
            {
                "card": "c",
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": "s"}],
                "outcomeTimestamp": "2024-05-01T12:00:00.52Z",
            },
            {
                "card": "c",
                "outcome": "overridden",
                "overrideReason": {"reason": {"system": "x", "code": "y"}, "userComment": "z"},
                "outcomeTimestamp": "2024-05-01T12:00:00+02:00",
            },
        ]
    }
    first, second = parse_feedback(body)
    assert first.accepted == ["s"] and second.reason == {"system": "x", "code": "y"} and second.comment == "z"
    assert first.idempotency_key() == parse_feedback(body)[0].idempotency_key() != second.idempotency_key()


@pytest.mark.parametrize(
    "item",
    [
        {"card": "c", "outcome": "accepted", "outcomeTimestamp": "2024-05-01T12:00:00Z"},
        {
            "card": "c",
            "outcome": "overridden",
            "acceptedSuggestions": [{"id": "s"}],
            "outcomeTimestamp": "2024-05-01T12:00:00Z",
        },
        {"card": "c", "outcome": "overridden", "outcomeTimestamp": "2024-05-01 12:00"},
        {"card": "c", "outcome": "overridden", "outcomeTimestamp": "2024-05-01T12:00:00"},
        {"card": "", "outcome": "overridden", "outcomeTimestamp": "2024-05-01T12:00:00Z"},
        {
            "card": "c",
            "outcome": "accepted",
            "overrideReason": {},
            "acceptedSuggestions": [{"id": "s"}],
            "outcomeTimestamp": "2024-05-01T12:00:00Z",
        },
    ],
)
def test_feedback_malformed_items_are_refused(item: dict[str, Any]) -> None:
    with pytest.raises(CdsError) as caught:
        parse_feedback({"feedback": [item]})
    assert caught.value.status == 400 and caught.value.expression.startswith("feedback[0]")


def test_prefetch_for_covers_every_key() -> None:
    assert set(prefetch_for([], "p1")) == {q.key for q in queries()}


def test_reference_index_ignores_odd_full_urls_and_ids() -> None:
    from rules.normalize import reference_index

    index = reference_index(
        [
            ([None], {"resourceType": "Medication", "id": ["x"]}),
            ("urn:uuid:1", {"resourceType": "Medication", "id": "m"}),
        ]
    )  # type: ignore[list-item]
    assert set(index) == {"urn:uuid:1", "Medication/m"}


def test_card_index_keeps_what_a_request_only_card_rests_on_and_whether_its_episode_is_open() -> None:
    index, patient = _index(), "p2"
    firing = _decisions(scenario(HYPOK, patient), patient)
    origin = {"hook": "patient-view", "user": "Practitioner/x"}
    (card,) = build_cards(firing, [], patient, index, NOW, origin=origin)
    record = index.get(card["uuid"])
    assert record is not None and record["card"]["summary"] == card["summary"] and record["open"] is True
    rests_on = record["alert"]
    assert rests_on["severity"] == "info" and rests_on["shown_user"] == "Practitioner/x"
    assert [e["concept"] for e in rests_on["evidence"]] == ["potassium"] and rests_on["explanation"]
    build_cards(_decisions(scenario(None, patient), patient), [], patient, index, NOW)  # the episode ends
    assert index.get(card["uuid"])["open"] is False
    assert index.get(str(uuid.uuid4())) is None


def test_medication_reference_to_another_resource_of_the_call_is_followed() -> None:
    from fhir_builders import FUROSEMIDE, med_request

    request = med_request(None, patient="p1", medicationReference={"reference": "Medication/m1"})
    medication = {"resourceType": "Medication", "id": "m1", "code": FUROSEMIDE}
    bundle = {"resourceType": "Bundle", "entry": [{"resource": request}, {"resource": medication}]}
    facts = facts_from([bundle], "p1", False, NormalizeCache(10))
    assert {f.concept for f in facts} == {"loop-diuretic"}


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("furosemide 40 MG Oral Tablet", "furosemide 40 MG Oral Tablet"),
        ("KCl <b>x</b> [a](https://e.x) *y* `z` & ~s~", "KCl <b>x</b> [a](https://e.x) *y* `z` & ~s~"),
        ("# heading\nline", "# heading line"),
        ("- item", "- item"),
        ("a\\b", "a\\b"),
    ],
)
def test_free_text_of_the_data_renders_as_literal_markdown_text(text: str, shown: str) -> None:
    from markdown_it import MarkdownIt

    from rules.cards import markdown_text

    html = MarkdownIt("commonmark", {"html": True}).enable(["strikethrough"]).render(markdown_text(text))
    expected = shown.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert html.replace("\u2060", "") == f"<p>{expected}</p>\n"  # word joiners keep URLs from being autolinked


def test_card_index_adopt_links_an_open_episode_to_the_alert_once() -> None:
    index, patient = _index(), "p1"
    (card,) = build_cards(_decisions(scenario(HYPOK, patient), patient), [], patient, index, NOW)
    assert index.adopt(patient, {}) == {}
    first = index.adopt(patient, {HYPOK: "alert-1", "other-rule": "alert-2"})
    assert set(first) == {"alert-1"}
    card_uuid, record = first["alert-1"]
    assert card_uuid == card["uuid"] and record is not None
    assert record["alert_id"] == "alert-1" and record["history"] == []
    assert index.adopt(patient, {HYPOK: "alert-1"}) == {"alert-1": (card["uuid"], None)}  # kept, not re-adopted
    assert index.get(card["uuid"])["alert_id"] == "alert-1"
    # The episode is no longer open: the rule firing again without an alert starts a new one.
    (again,) = build_cards(_decisions(scenario(HYPOK, patient), patient), [], patient, index, NOW)
    assert again["uuid"] != card["uuid"]
