"""An alert over its whole life (issue 10), through the real pipeline code and Lua scripts on an in-process
Redis: batches decide what one event at a time decides, alerts close when their rule stops firing (resolved,
expired, withdrawn, retracted), corrections re-decide, escalation re-opens, snoozes hold, future dates never
move a patient's clock, open-ended dates never poison a batch. The same sequences through real worker
processes are in tests/integration/test_lifecycle_live.py; random sequences in test_lifecycle_properties.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
import pytest
from fhir_builders import (
    ARRHYTHMIA,
    FUROSEMIDE,
    HYPOK,
    NOW,
    PATIENT,
    REFRACTORY,
    ago,
    magnesium,
    med_statement,
    potassium,
    qtc,
)

from config.settings import Settings
from rules.normalize import normalize_resource
from workers import due
from workers.events import Event, dump_batch, events_from, tombstone
from workers.pipeline import process_batch
from workers.state.store import Store


def make_store(**settings: Any) -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), Settings(redis_url=None, **settings))


def events(*resources: dict[str, Any], received: datetime = NOW) -> list[Event]:
    out = []
    for resource in resources:
        result = normalize_resource(resource)
        assert result.outcome == "accepted", (result.reason, result.issues)
        event = events_from(result, received)
        assert event is not None
        out.append(event)
    return out


def feed(store: Store, *resources: dict[str, Any], received: datetime = NOW) -> Any:
    return process_batch(dump_batch(events(*resources, received=received)), store)


def one_at_a_time(store: Store, resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        feed(store, resource)


def tick(store: Store, until: datetime, patient: str = PATIENT) -> None:
    from workers.events import tick as tick_event

    process_batch(dump_batch([tick_event(patient, until)]), store)


def history(store: Store, patient: str = PATIENT) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Every alert: rule, status, (action, at) of each history entry."""
    return sorted(
        (a["rule_id"], a["status"], [(h["action"], h["at"]) for h in a["history"]])
        for a in store.alerts_for_patient(patient)
    )


def only(store: Store, rule: str, patient: str = PATIENT) -> dict[str, Any]:
    [alert] = [a for a in store.alerts_for_patient(patient) if a["rule_id"] == rule]
    return alert


# --- 0. batches decide what one event at a time decides ---------------------------------------------


def test_a_batch_does_not_prune_what_its_earlier_events_need():
    """Problem 0a: K 3.1, then K 4.0 35 days later. The store used to prune against the batch's newest time
    before the earlier time was evaluated, so one Bundle raised no alert at all."""
    stay = [potassium(3.1, at=ago(24 * 36), id="k-early"), potassium(4.0, at=ago(24), id="k-late")]
    single = make_store()
    one_at_a_time(single, stay)
    batched = make_store()
    feed(batched, *stay)
    assert history(batched) == history(single)
    alert = only(batched, HYPOK)  # raised, then closed when the K left the 72 h look-back (before the K 4.0)
    assert [h["action"] for h in alert["history"]] == ["opened", "expired"]


def test_two_versions_of_one_order_in_one_batch_are_seen_in_turn():
    """Problem 0b / 12: the active version of a diuretic order counts while it was the one known; its later
    version arriving in the same batch does not rewrite what was decided before it arrived."""
    active = med_statement(FUROSEMIDE, start=ago(24 * 10), id="furo", version="1")
    stopped = med_statement(FUROSEMIDE, start=ago(24 * 10), end=ago(1), status="stopped", id="furo", version="2")
    sequence = [active, potassium(3.0, at=ago(60), id="k1"), potassium(3.2, at=ago(24), id="k2"), stopped]
    single = make_store()
    one_at_a_time(single, sequence)
    batched = make_store()
    feed(batched, *sequence)
    assert history(batched) == history(single)
    alert = only(batched, REFRACTORY)
    assert alert["history"][0]["action"] == "opened"
    assert alert["history"][0]["at"].startswith(ago(24).removesuffix("Z"))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_batches_of_every_size_record_the_same_history(size: int):
    sequence = [
        potassium(3.3, at=ago(24 * 9), id="k-a"),
        potassium(3.4, at=ago(24 * 8), id="k-b"),
        magnesium(0.8, at=ago(24 * 8 - 2), id="mg-a"),
        potassium(2.9, at=ago(30), id="k-c"),
        potassium(2.9, at=ago(30), id="k-c2", status="final"),
        potassium(3.9, at=ago(6), id="k-d"),
        potassium(3.0, at=ago(2), id="k-e"),
        magnesium(0.6, at=ago(1), id="mg-b"),
    ]
    single = make_store()
    one_at_a_time(single, sequence)
    chunked = make_store()
    for start in range(0, len(sequence), size):
        feed(chunked, *sequence[start : start + size])
    assert history(chunked) == history(single)
    assert len(history(single)) >= 3


# --- 1. an alert is open exactly while its rule fires ------------------------------------------------


def test_an_alert_whose_evidence_ages_out_expires_when_time_moves_on():
    """Problem 1: a K 3.3 alert stayed active 9 days later. Any later event (even an unrelated one) moves
    the patient's clock; the evidence has left the 72 h look-back, so the alert expires at that time."""
    store = make_store()
    feed(store, potassium(3.3, at=ago(24 * 9), id="k-old"))
    assert only(store, HYPOK)["status"] == "active"
    feed(store, qtc(440, at=ago(1), id="qtc-unrelated-later"))
    alert = only(store, HYPOK)
    assert alert["status"] == "expired"
    assert alert["history"][-1]["action"] == "expired"
    assert "aged out" in alert["history"][-1]["why"]
    assert not store.alerts_for_patient(PATIENT, open_only=True)


def test_time_alone_closes_an_alert_at_its_due_time():
    """Problem 1 without any later event: the patient is due when the K leaves the look-back; a tick (what
    the workers' due sweep sends) evaluates the patient at exactly that time."""
    store = make_store()
    feed(store, potassium(3.3, at=ago(10), id="k-only"))
    alert = only(store, HYPOK)
    assert alert["status"] == "active"
    [patient] = due.due_by(store.client, NOW + timedelta(days=30))
    assert patient == PATIENT
    tick(store, NOW + timedelta(days=9))
    alert = only(store, HYPOK)
    assert alert["status"] == "expired"
    expected = (NOW - timedelta(hours=10) + timedelta(hours=72)).strftime("%Y-%m-%dT%H:%M")
    assert alert["closed_at"].startswith(expected), alert["closed_at"]
    assert store.clock(PATIENT) is not None and store.clock(PATIENT).strftime("%Y-%m-%dT%H:%M") == expected
    assert due.due_by(store.client, NOW + timedelta(days=365)) == []


def test_a_critical_arrhythmia_alert_expires_when_its_qtc_ages_out():
    """Problem 1, second case: a critical alert from QTc 520 ms and a low Mg stayed open after the QTc left
    the 72 h look-back. Time alone (a tick) now closes it, Mg still low, no other arrhythmia evidence."""
    store = make_store()
    feed(store, qtc(520, at=ago(6), id="qtc-long"), magnesium(0.6, at=ago(5), id="mg-low"))
    alert = only(store, ARRHYTHMIA)
    assert (alert["status"], alert["severity"]) == ("active", "critical")
    tick(store, NOW + timedelta(days=4))
    alert = only(store, ARRHYTHMIA)
    assert alert["status"] == "expired" and alert["history"][-1]["action"] == "expired"


def test_a_tick_before_the_due_time_changes_nothing():
    store = make_store()
    feed(store, potassium(3.3, at=ago(10), id="k-only"))
    before = history(store)
    tick(store, NOW + timedelta(hours=1))
    assert history(store) == before


# --- 2. corrections re-decide ------------------------------------------------------------------------


def test_a_corrected_result_withdraws_the_alert_it_no_longer_supports():
    """Problem 2: furosemide, K 3.0 (day 1), K 3.2 (day 2.5) opens the refractory alert; the lab corrects
    the first K to 3.9 (version 2): the rule stops firing, the alert is withdrawn, citing the correction."""
    store = make_store()
    first = potassium(3.0, at=ago(60), id="k-corr", version="1")
    feed(store, med_statement(FUROSEMIDE, start=ago(24 * 10)), first, potassium(3.2, at=ago(24), id="k-second"))
    assert only(store, REFRACTORY)["status"] == "active"
    feed(store, potassium(3.9, at=ago(60), id="k-corr", version="2", status="corrected"))
    alert = only(store, REFRACTORY)
    assert alert["status"] == "withdrawn"
    assert alert["history"][-1]["action"] == "withdrawn" and "data changed" in alert["history"][-1]["why"]


def test_a_corrected_result_that_still_fires_updates_evidence_and_severity():
    store = make_store()
    feed(store, potassium(3.2, at=ago(5), id="k-x", version="1"))
    assert only(store, HYPOK)["severity"] == "info"
    feed(store, potassium(2.7, at=ago(5), id="k-x", version="2", status="corrected"))
    alert = only(store, HYPOK)
    assert alert["status"] == "active" and alert["severity"] == "warning"
    assert any(e["reference"].endswith("/_history/2") for e in alert["evidence"])
    assert not any(e["reference"].endswith("/_history/1") for e in alert["evidence"])


def test_entered_in_error_and_delete_retract():
    store = make_store()
    feed(store, potassium(3.1, at=ago(5), id="k-eie", version="1"))
    feed(store, potassium(3.1, at=ago(5), id="k-eie", version="2", status="entered-in-error"))
    assert only(store, HYPOK)["status"] == "retracted"
    other = make_store()
    feed(other, potassium(3.1, at=ago(5), id="k-del"))
    process_batch(dump_batch([tombstone(PATIENT, "Observation/k-del", NOW)]), other)
    assert only(other, HYPOK)["status"] == "retracted"


def test_a_delete_right_after_its_put_in_one_batch_retracts():
    """Problem 14 (worker side): the PUT and its DELETE in one batch, in that order."""
    store = make_store()
    batch = [*events(potassium(3.1, at=ago(5), id="k-gone")), tombstone(PATIENT, "Observation/k-gone", NOW)]
    process_batch(dump_batch(batch), store)
    assert only(store, HYPOK)["status"] == "retracted"
    assert store.timeline(PATIENT) == [] or all(f.retracted for f in store.timeline(PATIENT))


def test_a_delete_processed_before_its_put_wins():
    store = make_store()
    process_batch(dump_batch([tombstone(PATIENT, "Observation/k-early-del", NOW)]), store)
    counts = feed(store, potassium(3.1, at=ago(5), id="k-early-del"))
    assert counts["events_stale"] == 1
    assert store.alerts_for_patient(PATIENT) == []


# --- 3, 4. escalation re-opens; only escalation wakes a snooze ---------------------------------------


def test_an_overridden_alert_that_escalates_is_active_again():
    """Problem 3: an override at info; K falls below 3.0 (warning): the alert is active again, visibly."""
    store = make_store()
    feed(store, potassium(3.3, at=ago(20), id="k-1"))
    alert = only(store, HYPOK)
    store.transition(alert["id"], "override", "user:pharm", NOW, reason={"code": "x", "display": "Known"})
    feed(store, potassium(3.2, at=ago(10), id="k-2"))  # same severity: stays overridden
    assert only(store, HYPOK)["status"] == "overridden"
    feed(store, potassium(2.8, at=ago(2), id="k-3"))
    alert = only(store, HYPOK)
    assert alert["status"] == "active" and alert["severity"] == "warning"
    escalated = alert["history"][-1]
    assert escalated["action"] == "escalated" and escalated["from"] == "overridden"
    assert "info -> warning" in escalated["why"]
    assert alert["escalated_at"] == escalated["at"]
    assert [a["id"] for a in store.alerts_for_patient(PATIENT, open_only=True)] == [alert["id"]]


def test_acknowledge_records_what_was_seen_so_a_repeat_does_not_escalate():
    store = make_store()
    feed(store, potassium(2.9, at=ago(20), id="k-1"))
    alert = only(store, HYPOK)
    store.transition(alert["id"], "acknowledge", "user:pharm", NOW)
    feed(store, potassium(2.8, at=ago(10), id="k-2"))
    assert only(store, HYPOK)["status"] == "acknowledged"


# --- 5. time is guarded ------------------------------------------------------------------------------


def test_a_future_dated_result_never_moves_the_clock():
    """Problem 5: K 4.1 dated 2204 used to move the clock and blind the patient for good."""
    store = make_store()
    received = datetime(2024, 5, 1, 12, tzinfo=UTC)
    feed(store, potassium(4.1, at="2204-01-01T00:00:00Z", id="k-future"), received=received)
    assert store.clock(PATIENT) is None
    feed(store, potassium(2.6, at=ago(3), id="k-low-1"), received=received)
    feed(store, potassium(2.5, at=ago(1), id="k-low-2"), received=received)
    alert = only(store, HYPOK)
    assert alert["status"] == "active" and alert["severity"] == "warning"
    assert {f.resource_id for f in store.timeline(PATIENT)} >= {"k-future", "k-low-1", "k-low-2"}
    assert store.clock(PATIENT) == NOW - timedelta(hours=1)


def test_a_result_within_the_tolerance_moves_the_clock():
    store = make_store()
    feed(store, potassium(3.1, at=ago(-2), id="k-soon"), received=NOW)  # 2 h after receipt: clock skew
    assert store.clock(PATIENT) == NOW + timedelta(hours=2)


# --- 6. one open-ended date never poisons a batch ----------------------------------------------------


def test_an_open_ended_medication_is_stored_and_other_patients_are_processed():
    store = make_store()
    forever = med_statement(FUROSEMIDE, start=ago(24 * 30), end="9999-12-31", id="furo-forever")
    others = [potassium(3.0, at=ago(2), patient=f"other-{i}", id=f"k-other-{i}") for i in range(3)]
    counts = feed(store, forever, *others)
    assert counts["events_dead_lettered"] == 0
    assert counts["events_stored"] == 4
    assert all(store.alerts_for_patient(f"other-{i}") for i in range(3))
    assert [f.resource_id for f in store.timeline(PATIENT)] == ["furo-forever"]


# --- cost independent of history (issue 15) ----------------------------------------------------------


def _hourly_potassium(n: int, patient: str = PATIENT) -> list[Event]:
    start = NOW - timedelta(hours=n)
    out = []
    for i in range(n):
        at = (start + timedelta(hours=i)).isoformat().replace("+00:00", "Z")
        out.extend(events(potassium(3.8, at=at, id=f"k-h{i}", patient=patient), received=NOW + timedelta(days=1)))
    return out


def test_an_event_reads_only_its_window_of_a_long_history():
    """5,000 hourly K results stored (retention long enough to keep them all): a new event reads only the
    resources its rules can see (the longest look-back of any input), not the whole timeline."""
    from workers.pipeline import get_catalog, window_pad_hours

    store = make_store(retention_lab_hours=24 * 365)
    pad = window_pad_hours(get_catalog().evaluated())
    history_events = _hourly_potassium(5000)
    for start in range(0, len(history_events), 1000):  # stored only (evaluating each one is not the point)
        store.timelines.store_many({PATIENT: history_events[start : start + 1000]}, pad)
    assert len(store.timeline(PATIENT)) == 5000
    [new] = events(potassium(3.1, at=ago(0), id="k-new"))
    window = store.timelines.store_many({PATIENT: [new]}, pad)[PATIENT]
    assert len(window.resources) <= pad + 2, (len(window.resources), pad)
    assert len(window.resources) >= 72  # the last 72 h at least


def test_retention_prunes_with_bounded_work_per_call():
    from workers.state.timeline import PRUNE_LIMIT

    store = make_store(retention_lab_hours=100)
    old = _hourly_potassium(2 * PRUNE_LIMIT + 50)  # hours -250 .. -1: most are older than 100 h
    process_batch(dump_batch(old), store)
    stored = store.client.hlen(f"ehr:{{p:{PATIENT}}}:facts")
    assert stored == len(old) - PRUNE_LIMIT  # one call prunes at most PRUNE_LIMIT
    for i in range(3):
        feed(store, potassium(3.9, at=ago(-i * 0.1), id=f"k-next-{i}"))
    remaining = store.client.hlen(f"ehr:{{p:{PATIENT}}}:facts")
    assert remaining == len(store.timeline(PATIENT)) < 110  # only what retention keeps, after a few more calls
    assert store.client.zcard(f"ehr:{{p:{PATIENT}}}:tl") == remaining
    assert store.client.zcard(f"ehr:{{p:{PATIENT}}}:exp") == remaining
    assert all(store.patient_of(f"Observation/k-h{i}") is None for i in range(50))  # global index pruned too


# --- what never reaches a person otherwise: the data-problems queue (issue 13) ------------------------


def test_indeterminate_decisions_and_future_dates_reach_the_data_problems_queue():
    from workers.state.data_problems import DataProblems, ProblemQuery

    store = make_store()
    feed(store, potassium(3.1, "mmol/x", at=ago(1), id="k-odd-unit"))
    feed(store, potassium(3.4, at="2204-01-01T00:00:00Z", id="k-2204"))
    queue = DataProblems(store.client)
    items = queue.list(ProblemQuery()).items
    reasons = {(item["reason"], tuple(item["resources"])) for item in items}
    assert ("unknown-unit", ("Observation/k-odd-unit/_history/1",)) in reasons or (
        "unknown-unit",
        ("Observation/k-odd-unit",),
    ) in reasons, items
    assert any(r == "future-date" and refs[0].startswith("Observation/k-2204") for r, refs in reasons), items
    feed(store, potassium(3.0, at=ago(0.5), id="k-again"))  # the same cause again: one item, counted
    assert len(queue.list(ProblemQuery()).items) == len(items)


def test_a_patient_resource_is_neither_future_dated_nor_a_clock_mover():
    from fhir_builders import patient_resource

    from workers.state.data_problems import DataProblems, ProblemQuery

    store = make_store()
    feed(store, potassium(3.1, at=ago(30 * 24), id="k-old-stay"), received=NOW)
    person = patient_resource(meta={"versionId": "1", "lastUpdated": NOW.isoformat().replace("+00:00", "Z")})
    [event] = events(person, received=NOW)
    assert not event.is_future(24) and event.clock_time(24) is None
    process_batch(dump_batch([event]), store)
    assert store.clock(PATIENT) == NOW - timedelta(days=30)
    assert DataProblems(store.client).list(ProblemQuery()).items == []
