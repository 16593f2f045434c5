"""Alert transitions in the store (the Lua script run by fakeredis): legal and illegal moves, revision
conflicts, idempotency keys, snooze expiry, and a manual resolve that is not re-fired on the same evidence."""

from __future__ import annotations

from datetime import timedelta

import fakeredis
import pytest
from fhir_builders import NOW, PATIENT, ago, magnesium, potassium

from config.settings import Settings
from rules.normalize import normalize_resource
from workers.events import dump_batch, events_from
from workers.pipeline import process_batch
from workers.state.store import Store, TransitionError, effective_status

RULE = "hypokalemia-without-magnesium"


@pytest.fixture
def store() -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), Settings(redis_url=None))


def feed(store: Store, *resources: dict) -> None:
    events = [events_from(normalize_resource(r), NOW) for r in resources]
    process_batch(dump_batch([e for e in events if e is not None]), store)


def open_alert(store: Store, low_k: dict | None = None) -> dict:
    feed(store, low_k or potassium(2.9, at=ago(2)))
    [alert] = [a for a in store.alerts_for_patient(PATIENT, open_only=True) if a["rule_id"] == RULE]
    return alert


def test_find_alert_by_id_alone(store):
    alert = open_alert(store)
    assert store.find_alert(alert["id"])["id"] == alert["id"]
    assert store.find_alert("no-such-alert") is None


def test_acknowledge_then_override_records_actor_reason_and_revision(store):
    alert = open_alert(store)
    acked = store.transition(alert["id"], "acknowledge", "user:alice", NOW, expected_revision=alert["revision"])
    assert acked["status"] == "acknowledged"
    assert acked["revision"] == alert["revision"] + 1
    reason = {"system": "https://ehr-alerts.dev/fhir/CodeSystem/override-reason", "code": "x", "display": "X"}
    overridden = store.transition(alert["id"], "override", "user:bob", NOW, reason=reason, comment="on PO Mg")
    assert overridden["status"] == "overridden"
    last = overridden["history"][-1]
    assert (last["action"], last["by"], last["from"], last["to"]) == (
        "override",
        "user:bob",
        "acknowledged",
        "overridden",
    )
    assert last["reason"] == reason
    assert last["why"] == "X: on PO Mg"
    # An overridden alert stays the open episode: it is still listed as open and not re-opened.
    assert [a["id"] for a in store.alerts_for_patient(PATIENT, open_only=True) if a["rule_id"] == RULE] == [alert["id"]]


@pytest.mark.parametrize(
    ("first", "second"),
    [("acknowledge", "acknowledge"), ("resolve", "acknowledge"), ("override", "acknowledge"), ("resolve", "resolve")],
)
def test_illegal_transitions_are_refused(store, first, second):
    alert = open_alert(store)
    store.transition(alert["id"], first, "user:alice", NOW)
    with pytest.raises(TransitionError) as caught:
        store.transition(alert["id"], second, "user:alice", NOW)
    assert caught.value.code == "illegal"
    assert second in caught.value.message


def test_reopen_of_an_active_alert_is_illegal(store):
    alert = open_alert(store)
    with pytest.raises(TransitionError, match="cannot reopen an alert that is active"):
        store.transition(alert["id"], "reopen", "user:alice", NOW)


def test_stale_revision_is_a_conflict(store):
    alert = open_alert(store)
    store.transition(alert["id"], "acknowledge", "user:alice", NOW, expected_revision=alert["revision"])
    with pytest.raises(TransitionError) as caught:
        store.transition(alert["id"], "override", "user:bob", NOW, expected_revision=alert["revision"])
    assert caught.value.code == "conflict"
    assert store.find_alert(alert["id"])["status"] == "acknowledged"


def test_idempotency_key_makes_a_repeat_a_no_op(store):
    alert = open_alert(store)
    first = store.transition(alert["id"], "accept", "ehr:x", NOW, idempotency_key="fb-1", source="cds-hooks")
    again = store.transition(alert["id"], "accept", "ehr:x", NOW, idempotency_key="fb-1", source="cds-hooks")
    assert again["revision"] == first["revision"]
    assert len(again["history"]) == len(first["history"])
    assert first["history"][-1]["source"] == "cds-hooks"


def test_unknown_alert_and_bad_arguments(store):
    alert = open_alert(store)
    with pytest.raises(TransitionError) as caught:
        store.transition("missing", "acknowledge", "user:alice", NOW)
    assert caught.value.code == "not-found"
    with pytest.raises(TransitionError) as caught:
        store.transition(alert["id"], "delete", "user:alice", NOW)
    assert caught.value.code == "invalid"
    with pytest.raises(TransitionError) as caught:
        store.transition(alert["id"], "snooze", "user:alice", NOW, until=NOW - timedelta(hours=1))
    assert caught.value.code == "invalid"


def test_snooze_runs_out_and_then_counts_as_active(store):
    alert = open_alert(store)
    snoozed = store.transition(alert["id"], "snooze", "user:alice", NOW, until=NOW + timedelta(hours=4))
    assert snoozed["status"] == "snoozed"
    with pytest.raises(TransitionError):
        store.transition(alert["id"], "acknowledge", "user:alice", NOW + timedelta(hours=1))
    acked = store.transition(alert["id"], "acknowledge", "user:alice", NOW + timedelta(hours=5))
    assert acked["status"] == "acknowledged"
    assert acked["history"][-1]["from"] == "active"
    assert effective_status(snoozed, NOW + timedelta(hours=3)) == "snoozed"
    assert effective_status(snoozed, NOW + timedelta(hours=5)) == "active"


def test_only_escalation_wakes_a_snoozed_alert(store):
    alert = open_alert(store, potassium(3.3, at=ago(3)))
    assert alert["severity"] == "info"
    store.transition(alert["id"], "snooze", "user:alice", NOW, until=NOW + timedelta(days=2))
    feed(store, potassium(3.2, at=ago(2)))  # a repeat of the same severity: new evidence, still snoozed
    repeat = store.find_alert(alert["id"])
    assert repeat["status"] == "snoozed" and repeat["history"][-1]["action"] == "updated"
    feed(store, potassium(2.8, at=ago(1)))  # info -> warning: escalation wakes it, visibly
    woken = store.find_alert(alert["id"])
    assert woken["status"] == "active" and woken["severity"] == "warning"
    last = woken["history"][-1]
    assert last["action"] == "escalated" and last["from"] == "snoozed" and "info -> warning" in last["why"]


def test_manual_resolve_is_not_refired_on_the_same_evidence_but_is_on_new(store):
    low_k = potassium(2.9, at=ago(2))
    alert = open_alert(store, low_k)
    store.transition(alert["id"], "resolve", "user:alice", NOW, comment="Mg ordered by phone")
    feed(store, low_k)  # the same result again (a duplicate delivery)
    assert store.alerts_for_patient(PATIENT, open_only=True) == []
    feed(store, potassium(2.6, at=ago(1)))  # a new low result: a new episode
    [again] = store.alerts_for_patient(PATIENT, open_only=True)
    assert again["id"] != alert["id"]


def test_reopen_a_resolved_alert_unless_a_newer_one_is_open(store):
    alert = open_alert(store)
    store.transition(alert["id"], "resolve", "user:alice", NOW)
    reopened = store.transition(alert["id"], "reopen", "user:alice", NOW)
    assert reopened["status"] == "active"
    assert "closed_at" not in reopened
    store.transition(alert["id"], "resolve", "user:alice", NOW)
    feed(store, potassium(2.5, at=ago(1)))
    with pytest.raises(TransitionError, match="newer alert"):
        store.transition(alert["id"], "reopen", "user:alice", NOW)


def test_an_automatically_resolved_alert_closes_after_a_magnesium_result(store):
    alert = open_alert(store)
    store.transition(alert["id"], "acknowledge", "user:alice", NOW)
    feed(store, magnesium(0.8, at=ago(1)))
    closed = store.find_alert(alert["id"])
    assert closed["status"] == "resolved"
    assert closed["history"][-1]["by"] == "system"
