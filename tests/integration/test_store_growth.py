"""Store cost that follows the window and retention, not history (issue 15), on a real Redis: an event reads only
the facts its rules can see, expired facts and their index entries leave with bounded work per call, and closed
alerts leave after their retention with every index entry that points at them. Assertions are on what Redis
holds and on command counts, never on time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from itest_builders import HYPOK, T0, furosemide, potassium, ts

from config.settings import Settings
from rules.normalize import normalize_resource
from workers import due
from workers.events import Event, dump_batch, events_from
from workers.pipeline import get_catalog, process_batch, window_pad_hours
from workers.state import keys, review_index
from workers.state.store import Store
from workers.state.timeline import PRUNE_LIMIT


def _batch(*resources: dict[str, Any], received: datetime) -> list[dict[str, Any]]:
    events = [events_from(normalize_resource(r), received) for r in resources]
    return dump_batch([e for e in events if e is not None])


def _store(store: Store, **settings: Any) -> Store:
    """The fixture's store with other settings (same Redis, same key prefix)."""
    return Store(
        store.client, Settings(redis_url=store.settings.redis_url, key_prefix=store.settings.key_prefix, **settings)
    )


def _commands(client, *names: str) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names)


def test_an_event_for_a_patient_with_5000_facts_reads_only_its_window(store):
    """5,000 potassium results every 4 h (kept: retention 20 years) and one new result: the store returns the
    results of the longest look-back before it, not the history."""
    years = 24 * 365 * 20
    store = _store(store, retention_lab_hours=years)
    patient = "long"
    history = [potassium(f"h{i}", patient, 4.2, T0 - timedelta(hours=4 * (5000 - i))) for i in range(5000)]
    for start in range(0, 5000, 500):  # stored directly: the replay of 5,000 evaluations is not what is tested
        events = [Event.model_validate(e) for e in _batch(*history[start : start + 500], received=T0)]
        [window] = store.timelines.store_many({patient: events}, 0.0).values()
        assert set(window.statuses) == {"stored"}
    assert store.client.hlen(keys.patient_keys(patient)["facts"]) == 5000

    loaded: list[int] = []
    original = store.timelines._window

    def counted(name: str, result: list[Any]) -> Any:
        window = original(name, result)
        loaded.append(sum(len(r.facts) for r in window.resources.values()))
        return window

    store.timelines._window = counted  # type: ignore[method-assign]
    counts = process_batch(_batch(potassium("new", patient, 3.1, T0 + timedelta(hours=1)), received=T0), store)
    assert counts["events_stored"] == 1
    pad_hours = window_pad_hours(get_catalog().evaluated())  # the longest look-back: 168 h
    assert loaded == [int(pad_hours // 4) + 1]  # the 4-hourly results in [clock - 168 h, clock]: 43 of 5,000


def test_expired_facts_and_their_resource_index_entries_leave_with_bounded_work_per_call(store):
    """250 results kept 24 h; events 10 days later prune at most PRUNE_LIMIT resources each (HDEL calls
    counted), until every expired resource and its resource -> patient entry is gone."""
    store = _store(store, retention_lab_hours=24)
    patient = "pruned"
    old = [potassium(f"o{i}", patient, 4.2, T0 + timedelta(minutes=i)) for i in range(250)]
    process_batch(_batch(*old, received=T0 + timedelta(hours=5)), store)
    k = keys.patient_keys(patient)
    assert store.client.hlen(k["facts"]) == 250
    assert store.patient_of("Observation/o0") == patient

    per_call = []
    for day in range(3):
        at = T0 + timedelta(days=10, hours=day)
        before = _commands(store.client, "hdel")
        process_batch(_batch(potassium(f"n{day}", patient, 4.1, at), received=at), store)
        per_call.append(_commands(store.client, "hdel") - before)
    # the facts hash (script) and the resource index (bookkeeping) are each trimmed by at most PRUNE_LIMIT
    assert all(calls <= PRUNE_LIMIT + 5 for calls in per_call), per_call
    assert sorted(store.client.hkeys(k["facts"])) == ["Observation/n0", "Observation/n1", "Observation/n2"]
    assert store.client.zcard(k["tl"]) == store.client.zcard(k["exp"]) == 3
    assert store.patient_of("Observation/o0") is None
    assert store.patient_of("Observation/o249") is None
    assert store.patient_of("Observation/n2") == patient


@pytest.fixture
def closed_and_open(store):
    """Patient a: a low K opens the hypokalemia alert and a normal K resolves it. Patient b: an open one."""
    process_batch(_batch(potassium("a1", "a", 3.1, T0), received=T0), store)
    process_batch(_batch(potassium("a2", "a", 4.0, T0 + timedelta(hours=2)), received=T0), store)
    process_batch(_batch(potassium("b1", "b", 3.0, T0), received=T0), store)
    [closed] = store.alerts_for_patient("a")
    [still_open] = store.alerts_for_patient("b")
    assert (closed["rule_id"], closed["status"], still_open["status"]) == (HYPOK, "resolved", "active")
    index = review_index.ReviewIndex(store)
    index.sync()
    assert index.summaries([closed["id"]]) != [None]
    return closed, still_open, index


def test_closed_alerts_leave_after_their_retention_with_their_index_entries(store, closed_and_open):
    closed, still_open, index = closed_and_open
    client = store.client
    ref = f"a|{closed['id']}"
    assert client.zscore(keys.closed_alerts(), ref) is not None
    assert client.zscore(keys.closed_alerts(), f"b|{still_open['id']}") is None

    now = datetime.now(UTC)
    assert due.prune_closed_alerts(store, now) == 0  # closed just now: kept 90 days
    later = now + timedelta(days=store.settings.retention_closed_alert_days, minutes=1)
    assert due.prune_closed_alerts(store, later) == 1

    assert store.get_alert("a", closed["id"]) is None
    assert not client.exists(keys.alert_history("a", closed["id"]))
    assert client.zscore(keys.alert_index(), ref) is None
    assert client.hget(keys.alert_patients(), closed["id"]) is None
    assert client.zscore(keys.closed_alerts(), ref) is None
    assert index.summaries([closed["id"]]) == [None]
    assert not [
        k
        for k in client.scan_iter(match=f"{store.settings.key_prefix}:{{review}}:z:*")
        if client.zscore(k, closed["id"])
    ]
    # the open alert is untouched, and a sync does not bring the removed one back
    assert store.get_alert("b", still_open["id"])["status"] == "active"
    index.sync()
    assert index.summaries([closed["id"]]) == [None]


def test_closed_alert_retention_is_bounded_per_call_and_spares_a_reopened_alert(store):
    patients = ["c1", "c2", "c3"]
    for patient in patients:
        process_batch(_batch(potassium(f"{patient}-1", patient, 3.1, T0), received=T0), store)
        process_batch(_batch(potassium(f"{patient}-2", patient, 4.0, T0 + timedelta(hours=2)), received=T0), store)
    ids = {p: store.alerts_for_patient(p)[0]["id"] for p in patients}
    assert all(store.get_alert(p, ids[p])["status"] == "resolved" for p in patients)
    # a person reopens c3's alert: open again, out of the closed index
    store.transition(ids["c3"], "reopen", "pharm", T0 + timedelta(hours=3))
    assert store.client.zscore(keys.closed_alerts(), f"c3|{ids['c3']}") is None

    later = datetime.now(UTC) + timedelta(days=store.settings.retention_closed_alert_days + 1)
    assert due.prune_closed_alerts(store, later, limit=1) == 1
    assert due.prune_closed_alerts(store, later, limit=1) == 1
    assert due.prune_closed_alerts(store, later, limit=1) == 0
    assert store.get_alert("c1", ids["c1"]) is None and store.get_alert("c2", ids["c2"]) is None
    assert store.get_alert("c3", ids["c3"])["status"] == "active"


def _patient(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": patient,
        "birthDate": "1950-03-01",
        "name": [{"use": "official", "family": "Doe", "given": ["Jane"]}],
    }


def test_an_inactive_patient_is_forgotten_with_bounded_work_per_call(store):
    """A silent patient with 250 results, a Patient resource (kept forever while the patient has data) and no
    alert: after the inactivity retention the due sweep forgets everything, 100 resources per call; a silent
    patient with an open alert is kept."""
    client = store.client
    results = [potassium(f"q{i}", "quiet", 4.2, T0 + timedelta(minutes=i)) for i in range(250)]
    process_batch(_batch(_patient("quiet"), *results, received=T0 + timedelta(hours=5)), store)
    process_batch(_batch(potassium("x1", "alerted", 3.0, T0), received=T0), store)
    k = keys.patient_keys("quiet")
    assert client.hlen(k["facts"]) == 251
    assert client.sismember(keys.patients(), "quiet")
    assert client.hget(keys.patient_context(), "quiet")
    assert store.patient_of("Patient/quiet") == "quiet"

    now = datetime.now(UTC)
    assert due.retire_inactive_patients(store, now) == 0  # written just now
    assert client.hlen(k["facts"]) == 251
    later = now + timedelta(days=store.settings.retention_inactive_patient_days, minutes=1)
    removed, retired = [], 0
    while not retired:
        before = client.hlen(k["facts"])
        retired = due.retire_inactive_patients(store, later, limit=100)
        removed.append(before - client.hlen(k["facts"]))
    assert removed == [100, 100, 51]  # 250 results and the Patient resource, at most 100 per call
    assert not [key for key in client.scan_iter(match=f"{store.settings.key_prefix}:{{p:quiet}}:*")]
    assert not client.sismember(keys.patients(), "quiet")
    assert client.zscore(keys.patients_seen(), "quiet") is None
    assert client.hget(keys.patient_context(), "quiet") is None
    assert store.patient_of("Patient/quiet") is None and store.patient_of("Observation/q0") is None
    # the silent patient with an open alert keeps everything
    assert [a["status"] for a in store.alerts_for_patient("alerted")] == ["active"]
    assert client.hlen(keys.patient_keys("alerted")["facts"]) == 1
    assert client.sismember(keys.patients(), "alerted")
    # a forgotten patient who comes back starts a fresh timeline
    process_batch(_batch(potassium("q-new", "quiet", 4.0, T0 + timedelta(days=500)), received=T0), store)
    assert client.hkeys(k["facts"]) == ["Observation/q-new"]


def test_what_an_older_release_stored_is_backfilled_into_the_retention_indexes(store, closed_and_open):
    """Closed alerts and patients stored before the retention indexes existed are indexed by the due sweep,
    a bounded scan page per call, after which they leave like the others."""
    closed, _, _ = closed_and_open
    client = store.client
    client.delete(keys.closed_alerts(), keys.patients_seen())  # as a release without them left it
    now = datetime.now(UTC)
    calls = 0
    while not store.backfill_retention_indexes(now, count=1):
        calls += 1
        assert calls < 20
    assert client.zrange(keys.closed_alerts(), 0, -1) == [f"a|{closed['id']}"]
    assert sorted(client.zrange(keys.patients_seen(), 0, -1)) == ["a", "b"]
    assert store.backfill_retention_indexes(now)  # done: a no-op from now on
    later = now + timedelta(days=store.settings.retention_closed_alert_days + 1)
    assert due.apply_retention(store, later) == (1, 0)  # the due sweep's step; patients silent 91 days stay


def test_a_medication_without_an_end_is_read_by_every_event_until_its_retention(store):
    """An open medication (no end date) is in every window (tl score +inf) and leaves once
    retention_open_medication_hours have passed since its start or last update, whichever is later."""
    store = _store(store, retention_open_medication_hours=72)
    patient = "meds"
    received = T0 - timedelta(hours=1)
    process_batch(_batch(furosemide("furo", patient, since=ts(T0 - timedelta(hours=2))), received=received), store)
    k = keys.patient_keys(patient)
    assert store.client.zscore(k["tl"], "MedicationStatement/furo") == float("inf")
    # its expiry: the latest of start, lastUpdated (2024-03-01) and receipt, plus 72 h
    assert store.client.zscore(k["exp"], "MedicationStatement/furo") == (received + timedelta(hours=72)).timestamp()
    at = T0 + timedelta(hours=60)
    process_batch(_batch(potassium("k1", patient, 4.0, at), received=at), store)
    assert store.client.hexists(k["facts"], "MedicationStatement/furo")
    at = T0 + timedelta(hours=80)
    process_batch(_batch(potassium("k2", patient, 4.0, at), received=at), store)
    assert not store.client.hexists(k["facts"], "MedicationStatement/furo")
    assert store.patient_of("MedicationStatement/furo") is None
