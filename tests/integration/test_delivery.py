"""At-least-once in, exactly-once out: duplicates, shuffled order, concurrent workers, killed workers."""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from itest_builders import HYPOK, REFRACTORY, T0, alert_state, furosemide, magnesium, potassium

from rules.catalog import load_catalog
from rules.engine import Decision, evaluate
from rules.facts import latest_versions
from rules.normalize import normalize_resource
from workers.events import events_from


def expected_decisions(resources: list[dict[str, Any]], patient: str) -> dict[str, Decision]:
    """The decisions of the engine on the same facts, as of the patient's latest event time (as the
    workers evaluate), each distinct resource version once."""
    facts, times = [], []
    for resource in resources:
        result = normalize_resource(resource)
        assert result.outcome == "accepted", (resource["id"], result)
        event = events_from(result, datetime.now(UTC))
        assert event is not None
        facts += event.facts
        times.append(event.event_time)
    rules = load_catalog().evaluated()
    return {d.rule_id: d for d in evaluate(rules, latest_versions(facts), max(times), patient)}


def _scenario(patient: str) -> list[dict[str, Any]]:
    """Furosemide; K 3.2; K 3.1 30 h later; a low Mg 0.6 after it (so Mg can still explain the refractory
    hypokalemia and the rule keeps firing); the second K corrected to 2.8."""
    corrected = potassium(
        "k2", patient, 2.8, T0 + timedelta(hours=30), version=2, status="corrected", updated=T0 + timedelta(hours=33)
    )
    return [
        furosemide("ms-furo", patient),
        potassium("k1", patient, 3.2, T0),
        potassium("k2", patient, 3.1, T0 + timedelta(hours=30)),
        magnesium("mg1", patient, 0.6, T0 + timedelta(hours=31)),
        corrected,
    ]


def test_duplicates_and_shuffled_order_give_the_same_state(stack):
    stack.start_api(EHR_ALERTS_BATCH_SIZE="3")
    stack.start_worker()
    ordered = _scenario("ord-1")
    for resource in ordered:  # one request (one task) per event, in time order
        assert stack.post_ndjson([resource]).status_code == 202
        stack.drain(stable=0.2)
    shuffled = _scenario("shuf-1")
    shuffled += [shuffled[1], shuffled[2], shuffled[2], shuffled[4], shuffled[0]]  # duplicates, stale v1 of k2
    random.Random(7).shuffle(shuffled)
    assert stack.post_ndjson(shuffled).status_code == 202
    stack.drain()

    in_order = stack.open_alerts("ord-1")
    out_of_order = stack.open_alerts("shuf-1")
    assert alert_state(in_order) == alert_state(out_of_order)
    # And both equal what the engine says on the distinct facts.
    decisions = expected_decisions(_scenario("x"), "x")
    assert decisions[HYPOK].outcome == "not-fires" and decisions[HYPOK].resolves
    assert decisions[REFRACTORY].outcome == "fires"
    assert [(a["rule_id"], a["severity"]) for a in out_of_order] == [(REFRACTORY, decisions[REFRACTORY].severity)]
    evidence = {f"{e['resource_id']}/{e['version']}" for e in out_of_order[0]["evidence"]}
    assert "k2/2" in evidence and "k2/1" not in evidence, evidence
    # The refractory card tells the truth about magnesium (it was measured), in both.
    card = json.dumps(in_order[0]["card"], sort_keys=True).replace("ord-1", "shuf-1")
    assert card == json.dumps(out_of_order[0]["card"], sort_keys=True)
    counters = stack.store.counters()
    assert counters.get("events_duplicate", 0) + counters.get("events_stale", 0) >= 5
    assert stack.store.dead_letters() == []


def _synthetic(n_patients: int, seed: int) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """~10 events per patient: low K series; a third get a Mg after the last K, a third a normal K."""
    rng = random.Random(seed)
    per_patient: dict[str, list[dict[str, Any]]] = {}
    for i in range(n_patients):
        patient = f"syn-{i:04d}"
        base = T0 + timedelta(minutes=rng.randrange(0, 600))
        kind = i % 3
        n_k = 10 if kind == 0 else 9 if kind == 2 else 8
        resources = [
            potassium(f"k-{patient}-{j}", patient, round(rng.uniform(2.5, 3.4), 1), base + timedelta(hours=4 * j))
            for j in range(n_k)
        ]
        last = base + timedelta(hours=4 * (n_k - 1))
        if kind == 1:
            resources.append(magnesium(f"mg-{patient}-0", patient, 0.55, base + timedelta(hours=5)))
            resources.append(magnesium(f"mg-{patient}-1", patient, 0.8, last + timedelta(hours=1)))
        elif kind == 2:
            resources.append(potassium(f"k-{patient}-n", patient, 4.0, last + timedelta(hours=2)))
        per_patient[patient] = resources
    events = [r for rs in per_patient.values() for r in rs]
    events.sort(key=lambda r: r["meta"]["lastUpdated"])  # feed order
    return per_patient, events


def _check_final_state(stack, per_patient: dict[str, list[dict[str, Any]]]) -> None:
    failures = []
    for patient, resources in per_patient.items():
        decisions = expected_decisions(resources, patient)
        alerts = stack.store.alerts_for_patient(patient, open_only=True)
        rules_open = [a["rule_id"] for a in alerts]
        assert len(rules_open) == len(set(rules_open)), (patient, rules_open)
        every = stack.store.alerts_for_patient(patient)
        open_statuses = ("active", "acknowledged", "snoozed", "overridden")
        per_rule = [a["rule_id"] for a in every if a["status"] in open_statuses]
        assert len(per_rule) == len(set(per_rule)), (patient, per_rule)
        expected = {}
        for rule_id, d in decisions.items():
            if d.outcome == "fires":
                expected[rule_id] = d.severity
            else:
                assert d.outcome == "not-fires" and (d.resolves or rule_id not in rules_open), (patient, d)
        got = {a["rule_id"]: a["severity"] for a in alerts}
        if got != expected:
            failures.append((patient, got, expected))
    assert not failures, failures[:10]


def _missing(stack, per_patient: dict[str, list[dict[str, Any]]]) -> list[str]:
    missing = []
    for patient, resources in per_patient.items():
        present = {f.resource_id for f in stack.store.timeline(patient)}
        missing += [f"{patient}:{r['id']}" for r in resources if r["id"] not in present]
    return missing


@pytest.mark.slow
def test_sigkill_workers_mid_stream(stack):
    per_patient, events = _synthetic(300, seed=3)
    assert len(events) >= 2900
    stack.start_api(EHR_ALERTS_BATCH_SIZE="10")
    worker = stack.start_worker()
    chunks = [events[i : i + 500] for i in range(0, len(events), 500)]
    answers: list[int] = []

    def post() -> None:
        for chunk in chunks:
            answers.append(stack.post_ndjson(chunk).status_code)
            time.sleep(0.3)

    poster = threading.Thread(target=post)
    poster.start()
    kills = 0
    deadline = time.monotonic() + 120
    while kills < 3 and time.monotonic() < deadline:
        # Let the worker get going on something, then kill it with everything it holds.
        start = stack.store.counters().get("events_stored", 0)
        while stack.store.counters().get("events_stored", 0) < start + 50 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.2))
        assert stack.client.llen("ehr-alerts") + stack.client.hlen("unacked") > 0, "stream finished before kill"
        stack.kill_worker(worker)
        kills += 1
        worker = stack.start_worker()
    poster.join(120)
    assert kills == 3
    assert answers == [202] * len(chunks)
    stack.drain(timeout=120, stable=1.0)

    missing = _missing(stack, per_patient)
    assert not missing, f"{len(missing)} events never reached the timeline (lost): {missing[:20]}"
    counters = stack.store.counters()
    assert counters.get("events_stored", 0) + counters.get("events_duplicate", 0) >= len(events), counters
    assert stack.store.dead_letters() == []
    _check_final_state(stack, per_patient)


@pytest.mark.slow
def test_message_popped_by_a_frozen_worker_is_not_lost(stack):
    """The window that lost batches: kombu's BRPOP takes the message off the queue, and only the next round
    trip records it as unacknowledged. Freeze a worker blocked in BRPOP, send an event (Redis pops it into
    the frozen worker's socket), SIGKILL the worker: the message is in neither the queue nor ``unacked``.
    The inbox still holds the batch and the sweep of the next worker delivers it again."""
    stack.start_api()
    worker = stack.start_worker()
    db = str(stack.client.connection_pool.connection_kwargs.get("db", 0))
    deadline = time.monotonic() + 60
    while not any(c.get("cmd") == "brpop" and c.get("db") == db for c in stack.client.client_list()):
        assert time.monotonic() < deadline, "the worker never blocked in BRPOP"
        time.sleep(0.1)
    stack.freeze_worker(worker)
    assert stack.post_ndjson([potassium("k-frozen", "frozen-1", 2.9, T0)]).status_code == 202
    deadline = time.monotonic() + 10
    while stack.client.llen("ehr-alerts"):
        assert time.monotonic() < deadline, "the frozen worker's BRPOP did not take the message"
        time.sleep(0.05)
    assert stack.client.hlen("unacked") == 0  # the message now exists only in the dead worker's socket
    stack.kill_worker(worker)
    stack.start_worker()
    stack.drain(timeout=60)
    assert [f.resource_id for f in stack.store.timeline("frozen-1")] == ["k-frozen"]
    assert [a["rule_id"] for a in stack.store.alerts_for_patient("frozen-1", open_only=True)] == [HYPOK]
    assert stack.store.dead_letters() == []


@pytest.mark.slow
def test_two_workers_same_patients_no_stale_alert(stack):
    stack.start_api(EHR_ALERTS_BATCH_SIZE="1")
    stack.start_worker(concurrency=2)
    stack.start_worker(concurrency=2)
    time.sleep(2)  # both consuming
    patients = [f"race-{i:03d}" for i in range(100)]
    ks = [potassium(f"k-{p}", p, 2.9, T0) for p in patients]
    mgs = [magnesium(f"mg-{p}", p, 0.8, T0 + timedelta(minutes=90)) for p in patients]
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def send(resources: list[dict[str, Any]]) -> None:
        barrier.wait()
        codes.append(stack.post_ndjson("\n".join(json.dumps(r) for r in resources)).status_code)

    threads = [threading.Thread(target=send, args=(ks,)), threading.Thread(target=send, args=(mgs,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [202, 202]
    stack.drain()
    leftover = [
        p for p in patients if any(a["rule_id"] == HYPOK for a in stack.store.alerts_for_patient(p, open_only=True))
    ]
    assert leftover == []
    counters = stack.store.counters()
    assert counters.get("events_stored", 0) == 200, counters
    assert stack.store.dead_letters() == []
