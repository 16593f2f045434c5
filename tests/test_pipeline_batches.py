"""Batching does not change what is recorded: a batch gives the alerts, and their history, that the same
events one at a time give (the store's Lua scripts run by fakeredis)."""

from __future__ import annotations

import random

import fakeredis
import pytest
from fhir_builders import NOW, PATIENT, ago, magnesium, potassium

from config.settings import Settings
from rules.normalize import normalize_resource
from workers.events import dump_batch, events_from
from workers.pipeline import process_batch
from workers.state.store import Store

RULE = "hypokalemia-without-magnesium"


def _store() -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), Settings(redis_url=None))


def _events(*resources: dict) -> list[dict]:
    events = [events_from(normalize_resource(r), NOW) for r in resources]
    return dump_batch([e for e in events if e is not None])


def _record(store: Store) -> list[tuple[str, str, str | None, list[tuple[str, str]]]]:
    """Every alert of the patient: rule, status, severity, history (action, at)."""
    return sorted(
        (a["rule_id"], a["status"], a["severity"], [(h["action"], h["at"]) for h in a["history"]])
        for a in store.alerts_for_patient(PATIENT)
    )


def _stay() -> list[dict]:
    """A low K opens the alert; Mg measured 2 h later resolves it; a low K a week later (that Mg is out of
    the 72 h look-back by then) opens a new one."""
    return [
        potassium(3.0, at=ago(200), id="k1"),
        magnesium(0.8, at=ago(198), id="mg1"),
        potassium(3.1, at=ago(4), id="k2"),
    ]


def test_an_alert_that_opens_and_resolves_within_one_batch_is_recorded():
    store = _store()
    counts = process_batch(_events(*_stay()[:2]), store)
    [alert] = store.alerts_for_patient(PATIENT)
    assert alert["rule_id"] == RULE and alert["status"] == "resolved"
    assert [h["action"] for h in alert["history"]] == ["opened", "resolved"]
    assert alert["opened_at"] < alert["closed_at"]
    assert counts[f"alerts_opened:{RULE}"] == 1 and counts[f"alerts_resolved:{RULE}"] == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_batch_records_what_one_event_at_a_time_records(seed):
    arrival = _stay()
    random.Random(seed).shuffle(arrival)  # any order of arrival: the batch replays it one event at a time
    one_by_one = _store()
    for resource in arrival:
        process_batch(_events(resource), one_by_one)
    batched = _store()
    process_batch(_events(*arrival), batched)
    assert _record(batched) == _record(one_by_one)
    in_time_order = _store()
    process_batch(_events(*_stay()), in_time_order)
    # whatever the order, the same alert is open at the end (late data changes history, never the end)
    assert [status for *_, status, _, _ in _record(batched)].count("active") == 1
    open_batched = next(r for r in _record(batched) if r[1] == "active")
    assert open_batched[:3] == next(r for r in _record(in_time_order) if r[1] == "active")[:3]


def test_a_redelivered_batch_adds_no_history():
    store = _store()
    batch = _events(*_stay())
    process_batch(batch, store)
    before = _record(store)
    counts = process_batch(batch, store)
    assert _record(store) == before
    assert counts["events_duplicate"] == 3 and not any(k.startswith("alerts_") for k in counts)


@pytest.mark.parametrize("batched", [False, True])
def test_a_late_event_is_seen_as_of_the_patients_clock(batched):
    """An event older than what the patient already has is not replayed at its own time (the live
    stream could not have done so either): it joins the evaluation as of the patient's clock when it
    arrives, in a batch as one at a time."""
    store = _store()
    k, late_mg = potassium(3.1, at=ago(4), id="k2"), magnesium(0.8, at=ago(28), id="mg-late")
    process_batch(_events(k), store)
    process_batch(_events(late_mg, potassium(3.2, at=ago(3), id="k3")) if batched else _events(late_mg), store)
    [alert] = store.alerts_for_patient(PATIENT)
    clock = ago(4)  # the late Mg arrives first, while the clock is at the K of 4 h ago
    assert [h["action"] for h in alert["history"]] == ["opened", "resolved"]
    assert alert["history"][1]["at"].startswith(clock.removesuffix("Z")), (alert["history"], clock)
