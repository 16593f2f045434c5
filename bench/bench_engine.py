"""Benchmark of the pure rule engine (``rules.engine.evaluate``), relative to a JSON-parse baseline.

Three workloads run interleaved in the same process, on one synthetic patient of ~50 facts built as
real FHIR R4 resources (30 potassium results over 10 days, 8 magnesium in mmol/L, mg/dL and mEq/L,
2 QTc, 4 medications: loop, thiazide, loop (stopped) and KCl; 2 arrhythmia conditions):

* ``evaluate``  - ``evaluate(rules, facts, as_of, patient)`` with every rule of
  ``load_catalog().evaluated()``, ``as_of`` at the latest fact (two rules fire, so cards are rendered);
* ``parse``     - the baseline: ``TypeAdapter(list[Fact]).validate_json(blob)`` of the same facts,
  serialised once with ``Fact.model_dump_json()``;
* ``normalize`` - ``normalize_resources(resources)`` of the ~50 FHIR resources (``fhir.resources``
  validation included), for context.

Machines here are noisy, so each round times the three workloads back to back and the figure that
matters is the per-round ratio ``workload ops/s / parse ops/s``; the report gives the median and the
spread (min..max) over rounds. Absolute ops/s are printed too, but only the ratios compare across
machines.

Run from the repository root::

    .venv/bin/python bench/bench_engine.py            # ~1 min, writes bench/results/engine.json
    .venv/bin/python bench/bench_engine.py --quick    # a few seconds (CI smoke), engine-quick.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from rules.catalog import load_catalog
from rules.engine import evaluate
from rules.facts import Fact
from rules.model import Rule
from rules.normalize import normalize_resources

PATIENT = "bench-patient-1"
T0 = datetime(2024, 5, 1, 0, 0, tzinfo=UTC)
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# --- the patient -------------------------------------------------------------------------------------


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _observation(
    rid: str, loinc: str, display: str, at: datetime, value: float, unit: str, ucum_code: str | None = None
) -> dict[str, Any]:
    quantity: dict[str, Any] = {"value": value, "unit": unit, "system": UCUM, "code": ucum_code or unit}
    return {
        "resourceType": "Observation",
        "id": rid,
        "meta": {"versionId": "1", "lastUpdated": _ts(at + timedelta(minutes=40))},
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "effectiveDateTime": _ts(at),
        "issued": _ts(at + timedelta(minutes=40)),
        "valueQuantity": quantity,
    }


def _medication_statement(
    rid: str, rxnorm: str, text: str, start: datetime, end: datetime | None, status: str
) -> dict[str, Any]:
    period = {"start": _ts(start), **({"end": _ts(end)} if end else {})}
    return {
        "resourceType": "MedicationStatement",
        "id": rid,
        "meta": {"versionId": "1", "lastUpdated": _ts(start)},
        "status": status,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": rxnorm}], "text": text},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "effectivePeriod": period,
    }


def _condition(rid: str, system: str, code: str, display: str, onset: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": rid,
        "meta": {"versionId": "1", "lastUpdated": _ts(onset)},
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "verificationStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]
        },
        "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "onsetDateTime": _ts(onset),
    }


def build_resources() -> list[dict[str, Any]]:
    """The FHIR R4 resources of the benchmark patient (46 resources, one fact each)."""
    resources: list[dict[str, Any]] = []
    # 30 potassium results, every 8 h over 10 days, drifting down into the low range at the end.
    k_values = [4.1, 4.0, 3.9, 4.2, 3.8, 3.7, 3.9, 3.6, 3.8, 3.5, 3.7, 3.6, 3.4, 3.6, 3.5, 3.3]
    k_values += [3.5, 3.4, 3.6, 3.3, 3.2, 3.4, 3.3, 3.1, 3.4, 3.2, 3.0, 3.3, 3.1, 3.2]
    for i, value in enumerate(k_values):
        at = T0 + timedelta(hours=8 * i)
        resources.append(
            _observation(f"k-{i:02d}", "2823-3", "Potassium [Moles/volume] in Serum or Plasma", at, value, "mmol/L")
        )
    # 8 magnesium results in mixed units, the latest low.
    mg = [
        ("2601-3", 0.82, "mmol/L", "mmol/L"),
        ("19123-9", 1.9, "mg/dL", "mg/dL"),
        ("2601-3", 1.6, "mEq/L", "meq/L"),
        ("2601-3", 0.74, "mmol/L", "mmol/L"),
        ("19123-9", 1.7, "mg/dL", "mg/dL"),
        ("2601-3", 1.4, "mEq/L", "meq/L"),
        ("19123-9", 1.6, "mg/dL", "mg/dL"),
        ("2601-3", 0.62, "mmol/L", "mmol/L"),
    ]
    mg_names = {
        "2601-3": "Magnesium [Moles/volume] in Serum or Plasma",
        "19123-9": "Magnesium [Mass/volume] in Serum or Plasma",
    }
    for i, (loinc, value, unit, code) in enumerate(mg):
        at = T0 + timedelta(hours=30 * i + 4)
        resources.append(_observation(f"mg-{i}", loinc, mg_names[loinc], at, value, unit, code))
    # 2 QTc values, one of them prolonged.
    resources.append(_observation("qtc-0", "8636-3", "Q-T interval corrected", T0 + timedelta(days=3), 470, "ms"))
    resources.append(
        _observation(
            "qtc-1", "76635-2", "Q-T interval corrected based on Bazett formula", T0 + timedelta(days=9), 512, "ms"
        )
    )
    # 4 medications: furosemide (loop), torsemide (loop, stopped), hydrochlorothiazide, potassium chloride.
    resources.append(_medication_statement("med-furo", "4603", "Furosemide 40 mg tablet", T0, None, "active"))
    resources.append(
        _medication_statement(
            "med-tors", "38413", "Torsemide 20 mg tablet", T0 - timedelta(days=30), T0 - timedelta(days=2), "completed"
        )
    )
    resources.append(
        _medication_statement(
            "med-hctz", "5487", "Hydrochlorothiazide 25 mg tablet", T0 + timedelta(days=2), None, "active"
        )
    )
    resources.append(
        _medication_statement(
            "med-kcl", "8591", "Potassium chloride 20 mEq ER tablet", T0 + timedelta(days=5), None, "active"
        )
    )
    # 2 arrhythmia conditions: SNOMED atrial fibrillation, ICD-10-CM ventricular tachycardia.
    resources.append(_condition("cond-af", SNOMED, "49436004", "Atrial fibrillation", T0 - timedelta(days=400)))
    resources.append(_condition("cond-vt", ICD10CM, "I47.2", "Ventricular tachycardia", T0 + timedelta(days=6)))
    return resources


def normalise(resources: list[dict[str, Any]]) -> list[Fact]:
    """Facts of the resources; fail loudly if any resource was not accepted."""
    results = normalize_resources(resources)
    refused = [
        f"{r.resource_type}/{r.resource_id}: {r.outcome} ({r.reason})" for r in results if r.outcome != "accepted"
    ]
    if refused:
        raise SystemExit("benchmark patient does not normalise cleanly:\n  " + "\n  ".join(refused))
    return [fact for r in results for fact in r.facts]


# --- timing ------------------------------------------------------------------------------------------


def calibrate(func: Callable[[], object], target: float) -> int:
    """Inner-loop count so that one timed batch of ``func`` takes about ``target`` seconds."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            func()
        elapsed = time.perf_counter() - start
        if elapsed >= target / 4 or number >= 1 << 20:
            return max(1, round(number * target / max(elapsed, 1e-9)))
        number *= 4


def timed_batch(func: Callable[[], object], number: int) -> float:
    """Ops per second of one batch of ``number`` calls."""
    start = time.perf_counter()
    for _ in range(number):
        func()
    return number / (time.perf_counter() - start)


def summary(values: list[float]) -> dict[str, float]:
    """Median and spread of per-round figures."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread_pct": 100 * (max(values) - min(values)) / median if median else 0.0,
    }


def run(quick: bool) -> dict[str, Any]:
    """Build the workloads, time them interleaved, and return the results document."""
    resources = build_resources()
    facts = normalise(resources)
    rules: list[Rule] = load_catalog().evaluated()
    as_of = max(f.start for f in facts if f.start is not None)
    blob = "[" + ",".join(f.model_dump_json() for f in facts) + "]"
    adapter = TypeAdapter(list[Fact])
    if adapter.validate_json(blob) != facts:
        raise SystemExit("facts do not round-trip through JSON")
    decisions = evaluate(rules, facts, as_of, PATIENT)
    outcomes = {d.rule_id: d.outcome for d in decisions}

    workloads: dict[str, Callable[[], object]] = {
        "parse": lambda: adapter.validate_json(blob),
        "evaluate": lambda: evaluate(rules, facts, as_of, PATIENT),
        "normalize": lambda: normalize_resources(resources),
    }
    target = 0.05 if quick else 0.25
    rounds = 3 if quick else 15
    for func in workloads.values():  # warm-up: caches (templates, value sets), allocator, branch history
        calibrate(func, target / 2)
    numbers = {name: calibrate(func, target) for name, func in workloads.items()}

    samples: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(rounds):
        gc.collect()
        for name, func in workloads.items():
            samples[name].append(timed_batch(func, numbers[name]))

    ratios = {
        name: [ops / base for ops, base in zip(samples[name], samples["parse"], strict=True)]
        for name in workloads
        if name != "parse"
    }
    figures = {
        name: {
            "ops_per_s": summary(samples[name]),
            "ratio_to_parse": summary(ratios[name]) if name in ratios else None,
            "calls_per_batch": numbers[name],
        }
        for name in workloads
    }
    figures["evaluate"]["rule_evaluations_per_s_median"] = figures["evaluate"]["ops_per_s"]["median"] * len(rules)
    return {
        "benchmark": "rules.engine.evaluate vs JSON parse of the same facts",
        "mode": "quick" if quick else "full",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "pydantic": metadata.version("pydantic"),
            "fhir.resources": metadata.version("fhir.resources"),
        },
        "workload": {
            "resources": len(resources),
            "facts": len(facts),
            "facts_by_concept": {
                c: sum(1 for f in facts if f.concept == c) for c in sorted({f.concept for f in facts})
            },
            "rules": [r.id for r in rules],
            "as_of": as_of.isoformat(),
            "outcomes": outcomes,
            "json_blob_bytes": len(blob.encode()),
        },
        "method": {
            "timer": "time.perf_counter",
            "rounds": rounds,
            "batch_seconds_target": target,
            "interleaved": True,
            "ratio": "per round: workload ops/s divided by parse ops/s of the same round",
            "spread_pct": "(max - min) / median over rounds",
        },
        "figures": figures,
    }


def print_table(doc: dict[str, Any]) -> None:
    """Short human summary of a results document."""
    work = doc["workload"]
    print(
        f"{work['facts']} facts from {work['resources']} FHIR resources, {len(work['rules'])} rules, "
        f"{doc['method']['rounds']} rounds ({doc['mode']}); outcomes: {work['outcomes']}"
    )
    print(f"{'workload':<10} {'ops/s (median)':>15} {'ops/s min..max':>22} {'ratio to parse':>15} {'ratio spread':>20}")
    for name, fig in doc["figures"].items():
        ops, ratio = fig["ops_per_s"], fig["ratio_to_parse"]
        ratio_text = f"{ratio['median']:.3f}" if ratio else "1 (baseline)"
        spread = f"{ratio['min']:.3f}..{ratio['max']:.3f}" if ratio else ""
        print(
            f"{name:<10} {ops['median']:>15,.1f} {ops['min']:>10,.1f}..{ops['max']:<11,.1f}"
            f" {ratio_text:>15} {spread:>20}"
        )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few seconds only (CI smoke)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="results file (default: bench/results/engine.json, or engine-quick.json with --quick)",
    )
    args = parser.parse_args(argv)
    doc = run(args.quick)
    output = args.output or RESULTS_DIR / ("engine-quick.json" if args.quick else "engine.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print_table(doc)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
