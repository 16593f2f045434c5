"""The engine's decisions on two realistic timelines, pinned to what the engine gave before its CPU work.

Every decision (outcome, severity, resolves, evidence, explanation, card) of every rule, evaluated after
each resource of the example stream (``examples/stream/events.ndjson``) and of a 40-patient synthetic feed
(``bench/stream_data.py``), must equal ``tests/data/engine_golden.json.gz``. The file was written by the
engine as it was before explanations, evidence and card rendering were made lazy / cheaper; regenerate it
(``python tests/test_engine_golden.py --write``) only for an intended change of rule output.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from rules.catalog import load_catalog
from rules.engine import evaluate
from rules.facts import Fact, latest_versions
from rules.normalize import normalize_resources

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "engine_golden.json.gz"


def _synthetic_feed(patients: int) -> list[dict[str, Any]]:
    spec = importlib.util.spec_from_file_location("stream_data", ROOT / "bench" / "stream_data.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate(patients)


def _feeds() -> dict[str, list[dict[str, Any]]]:
    lines = (ROOT / "examples" / "stream" / "events.ndjson").read_text(encoding="utf-8").splitlines()
    return {"example": [json.loads(line) for line in lines if line.strip()], "synthetic": _synthetic_feed(40)}


def _steps(resources: list[dict[str, Any]]) -> list[tuple[str, list[Fact], datetime]]:
    """(patient, timeline, as_of) after each resource that gave facts, as the stream sees it."""
    steps = []
    timeline: dict[str, list[Fact]] = defaultdict(list)
    for result in normalize_resources(resources):
        if not result.facts:
            continue
        patient = result.patient or result.facts[0].patient
        timeline[patient].extend(result.facts)
        facts = latest_versions(timeline[patient])
        as_of = max(t for f in facts for t in (f.start or f.updated, f.updated) if t is not None)
        steps.append((patient, facts, as_of))
    return steps


def decisions_now() -> dict[str, list[list[dict[str, Any]]]]:
    """Every decision of every step of both feeds, as JSON-ready dicts."""
    rules = load_catalog().evaluated()
    return {
        name: [
            [d.model_dump(mode="json") for d in evaluate(rules, facts, as_of, p)] for p, facts, as_of in _steps(feed)
        ]
        for name, feed in _feeds().items()
    }


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(gzip.decompress(GOLDEN.read_bytes()))


@pytest.fixture(scope="module")
def current() -> dict[str, Any]:
    return decisions_now()


@pytest.mark.parametrize("feed", ["example", "synthetic"])
def test_decisions_equal_the_recorded_ones(feed: str, golden: dict[str, Any], current: dict[str, Any]) -> None:
    assert len(current[feed]) == len(golden[feed])
    outcomes = {d["outcome"] for step in golden[feed] for d in step}
    assert "fires" in outcomes and "not-fires" in outcomes  # the feed exercises cards and explanations
    for index, (now, then) in enumerate(zip(current[feed], golden[feed], strict=True)):
        assert now == then, f"{feed} step {index}"


def test_a_decision_reads_the_same_after_pickling_and_keeps_the_dump_shape() -> None:
    """The evidence is built on first read; a pickled decision (e.g. sent to another process) carries it."""
    rules = load_catalog().evaluated()
    patient, facts, as_of = _steps(_feeds()["example"])[-1]
    decisions = evaluate(rules, facts, as_of, patient)
    for decision in decisions:
        copy = pickle.loads(pickle.dumps(decision))
        assert copy == decision
        assert copy.explanation == decision.explanation and copy.evidence == decision.evidence
        assert list(decision.model_dump()) == [
            "rule_id", "rule_version", "rule_status", "patient", "as_of", "outcome", "severity", "resolves",
            "escalators", "next_change", "evidence", "explanation", "card", "parameters",
        ]  # fmt: skip


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_bytes(gzip.compress(json.dumps(decisions_now(), sort_keys=True).encode(), mtime=0))
