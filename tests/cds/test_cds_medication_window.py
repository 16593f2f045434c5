"""Why the medication prefetch asks for ``status=active`` only (issue 4, medication windows).

``refractory-hypokalemia-on-diuretic`` reads its diuretic input with ``select: active`` and a 72 h look-back,
and the normaliser counts a medication only while its status is ``active`` (``rules/normalize.py``): the
look-back widens *when* an active record may have ended (an active statement whose period closed inside the
window still counts), not *which* statuses count. A diuretic recorded as stopped or completed inside the window
does not count, on the stream or in a CDS call, so an ``active`` search misses nothing the rule would use.
These tests pin that; if the rule ever counts recently stopped diuretics, the prefetch must widen with it."""

from __future__ import annotations

import pytest
from cds_support import REFRACTORY, h, now, prefetch_for, queries
from fhir_builders import FUROSEMIDE, med_request, med_statement, potassium

from rules.engine import evaluate
from service.cds.orders import facts_from
from workers.pipeline import get_catalog


def _outcome(resources: list[dict], patient: str) -> str:
    rules = [r for r in get_catalog().evaluated() if r.id == REFRACTORY]
    decisions = evaluate(rules, facts_from(resources, patient, include_preliminary=False), now(), patient)
    return decisions[0].outcome


def _low_k(patient: str) -> list[dict]:
    return [potassium(3.2, at=h(40), patient=patient), potassium(3.3, at=h(4), patient=patient)]


@pytest.mark.parametrize("status", ["stopped", "completed", "on-hold"])
@pytest.mark.parametrize("kind", ["statement", "request"])
def test_a_diuretic_stopped_inside_the_look_back_does_not_count(status: str, kind: str) -> None:
    patient = f"medwin-{kind}-{status}"
    if kind == "statement":
        med = med_statement(FUROSEMIDE, status=status, start=h(24 * 20), end=h(24), patient=patient)
    else:
        validity = {"validityPeriod": {"start": h(24 * 20), "end": h(24)}}
        med = med_request(FUROSEMIDE, status=status, authored=h(24 * 20), patient=patient, dispenseRequest=validity)
    assert _outcome([med, *_low_k(patient)], patient) == "not-fires"
    # what the advertised prefetch would send (active only) decides the same
    assert _outcome([r for b in prefetch_for([med, *_low_k(patient)], patient).values() for e in b["entry"]
                     for r in [e["resource"]]], patient) == "not-fires"  # fmt: skip


def test_an_active_diuretic_whose_period_ended_inside_the_look_back_counts_and_is_prefetched() -> None:
    patient = "medwin-active-ended"
    med = med_statement(FUROSEMIDE, status="active", start=h(24 * 20), end=h(24), patient=patient)
    resources = [med, *_low_k(patient)]
    assert _outcome(resources, patient) == "fires"
    prefetched = prefetch_for(resources, patient)
    assert [e["resource"]["id"] for e in prefetched["medicationStatements"]["entry"]] == [med["id"]]
    assert _outcome([e["resource"] for b in prefetched.values() for e in b["entry"]], patient) == "fires"


def test_the_medication_searches_ask_for_active_records() -> None:
    by_key = {q.key: q for q in queries()}
    for key in ("medicationStatements", "medicationRequests"):
        assert ("status", "active") in by_key[key].params
