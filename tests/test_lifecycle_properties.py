"""Properties of the alert lifecycle over random event sequences of a few patients (hypothesis), through the
real pipeline code and Lua scripts on an in-process Redis:

1. the same events in the same order give the same alert history whatever the batch sizes;
2. in any order, with duplicates, in any batches, the open alerts at the end are the same, and they are
   exactly the rules the engine says fire at each patient's clock (the alert store agrees with the engine).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import fakeredis
from fhir_builders import FUROSEMIDE, NOW, condition, magnesium, med_statement, potassium, qtc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import Settings
from rules.engine import evaluate
from rules.normalize import normalize_resource
from workers.events import Event, dump_batch, events_from, tombstone
from workers.pipeline import get_catalog, process_batch
from workers.state.store import Store

PATIENTS = ("prop-a", "prop-b")
RECEIVED = NOW + timedelta(days=30)  # every event is received after its time: nothing is future-dated
BASE = NOW - timedelta(days=12)


def _at(hours: int) -> str:
    return (BASE + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


@dataclass
class Generated:
    """A random sequence of events, and the labels that say what each one was (for failure messages)."""

    events: list[Event]
    labels: list[str]


def _event(resource: dict[str, Any]) -> Event:
    result = normalize_resource(resource)
    assert result.outcome == "accepted", (result.reason, result.issues)
    event = events_from(result, RECEIVED)
    assert event is not None
    return event


@st.composite
def sequences(draw: st.DrawFn) -> Generated:
    """Labs, corrections, retractions, deletes, diuretics and arrhythmia evidence for two patients."""
    events: list[Event] = []
    labels: list[str] = []
    results: list[tuple[str, str, int, int]] = []  # (patient, id, hours, version) of K / Mg results
    for n in range(draw(st.integers(min_value=3, max_value=14))):
        patient = draw(st.sampled_from(PATIENTS))
        hours = draw(st.integers(min_value=0, max_value=12 * 24))
        kind = draw(st.sampled_from(["k", "k", "k", "mg", "mg", "correct", "retract", "delete", "diuretic", "qtc"]))
        if kind in ("correct", "retract", "delete") and not results:
            kind = "k"
        if kind == "k":
            value = draw(st.sampled_from([2.6, 2.9, 3.2, 3.4, 3.6, 4.1]))
            rid = f"k{n}"
            events.append(_event(potassium(value, at=_at(hours), id=rid, patient=patient, version="1")))
            results.append((patient, rid, hours, 1))
            labels.append(f"{patient} K {value} @{hours}h")
        elif kind == "mg":
            value = draw(st.sampled_from([0.45, 0.6, 0.8]))
            rid = f"mg{n}"
            events.append(_event(magnesium(value, at=_at(hours), id=rid, patient=patient, version="1")))
            results.append((patient, rid, hours, 1))
            labels.append(f"{patient} Mg {value} @{hours}h")
        elif kind == "correct":
            i = draw(st.integers(min_value=0, max_value=len(results) - 1))
            patient, rid, at, version = results[i]
            value = draw(st.sampled_from([2.8, 3.3, 3.9]))
            builder = potassium if rid.startswith("k") else magnesium
            resource = builder(value, at=_at(at), id=rid, patient=patient, version=str(version + 1), status="corrected")
            events.append(_event(resource))
            results[i] = (patient, rid, at, version + 1)
            labels.append(f"{patient} correct {rid} -> {value}")
        elif kind == "retract":
            i = draw(st.integers(min_value=0, max_value=len(results) - 1))
            patient, rid, at, version = results[i]
            builder = potassium if rid.startswith("k") else magnesium
            resource = builder(3.0, at=_at(at), id=rid, patient=patient, version=str(version + 1))
            resource["status"] = "entered-in-error"
            events.append(_event(resource))
            results[i] = (patient, rid, at, version + 1)
            labels.append(f"{patient} entered-in-error {rid}")
        elif kind == "delete":
            patient, rid, _, _ = draw(st.sampled_from(results))
            events.append(tombstone(patient, f"Observation/{rid}", RECEIVED))
            labels.append(f"{patient} DELETE {rid}")
        elif kind == "diuretic":
            start = max(0, hours - 24 * 5)
            events.append(_event(med_statement(FUROSEMIDE, start=_at(start), id=f"furo{n}", patient=patient)))
            labels.append(f"{patient} furosemide from {start}h")
        else:
            if draw(st.booleans()):
                value = draw(st.sampled_from([440, 520]))
                events.append(_event(qtc(value, at=_at(hours), id=f"qtc{n}", patient=patient)))
                labels.append(f"{patient} QTc {value} @{hours}h")
            else:
                events.append(_event(condition(onset=_at(hours), id=f"af{n}", patient=patient)))
                labels.append(f"{patient} AF condition from {hours}h")
    return Generated(events, labels)


def _store() -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), Settings(redis_url=None))


def _run(store: Store, events: list[Event], sizes: list[int]) -> None:
    position = 0
    for size in sizes:
        if position >= len(events):
            break
        process_batch(dump_batch(events[position : position + size]), store)
        position += size
    if position < len(events):
        process_batch(dump_batch(events[position:]), store)


def _history(store: Store) -> list[Any]:
    return sorted(
        (p, a["rule_id"], a["status"], a["severity"], [(h["action"], h["at"]) for h in a["history"]])
        for p in PATIENTS
        for a in store.alerts_for_patient(p)
    )


def _open(store: Store) -> dict[tuple[str, str], tuple[str, list[str]]]:
    return {
        (p, a["rule_id"]): (a["severity"], sorted(e["reference"] for e in a["evidence"]))
        for p in PATIENTS
        for a in store.alerts_for_patient(p, open_only=True)
    }


def _engine(store: Store) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """What the engine says fires at each patient's clock, on the stored timeline."""
    rules = [r for r in get_catalog().evaluated() if r.status == "active"]
    firing = {}
    for patient in PATIENTS:
        clock = store.clock(patient)
        if clock is None:
            continue
        for decision in evaluate(rules, store.timeline(patient), clock, patient):
            if decision.fires:
                firing[(patient, decision.rule_id)] = (
                    decision.severity,
                    sorted(e.reference for e in decision.evidence),
                )
    return firing


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(sequences(), st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=14))
def test_batches_of_any_size_record_what_one_at_a_time_records(generated: Generated, sizes: list[int]):
    single = _store()
    _run(single, generated.events, [1] * len(generated.events))
    batched = _store()
    _run(batched, generated.events, sizes)
    assert _history(batched) == _history(single), generated.labels


@PROPERTY
@given(sequences(), st.randoms(use_true_random=False), st.lists(st.integers(min_value=1, max_value=6), min_size=1))
def test_any_order_with_duplicates_ends_with_the_alerts_the_engine_fires(
    generated: Generated, rnd: random.Random, sizes: list[int]
):
    in_order = _store()
    _run(in_order, generated.events, [1] * len(generated.events))
    expected = _open(in_order)
    assert expected == _engine(in_order), generated.labels

    arrival = list(generated.events) + rnd.sample(generated.events, k=min(3, len(generated.events)))
    rnd.shuffle(arrival)  # late data, redeliveries and duplicates
    shuffled = _store()
    _run(shuffled, arrival, sizes)
    assert _open(shuffled) == expected, generated.labels
    assert _engine(shuffled) == expected, generated.labels
