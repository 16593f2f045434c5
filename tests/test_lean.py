"""Issue 15: the lean models (``rules/lean.py``) give the same facts as full ``fhir.resources`` validation.

Every resource of the shared real data (``/work/shared/data`` when present, else its copy in ``tests/data/shared``:
FHIR files, the sandbox requests' prefetch and draft orders), the tests' data and the example stream is
normalised both ways (the CDS path's lenient reading, ``rules.tolerance``, with and without ``lean``); the
results must agree: outcome, facts, reason, issues, and the left-out reason a CDS call logs. A hypothesis
property then varies resources (members read by the rules given odd values, unread members given anything) and
checks the contract: the lean path is never more lenient where the rules read, and where the full path rejects a
resource only for something no rule reads, the lean path gives the facts of the resource without it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cds_support import example_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules import lean
from rules.normalize import NormalizeOptions, NormalizeResult, iter_resources, reference_index
from rules.tolerance import normalize_leniently
from service.cds.orders import left_out_reason

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/data") if Path("/work/shared/data").is_dir() else ROOT / "tests" / "data" / "shared"
PATIENT = "cds-context-patient"


def _json_files() -> Iterator[Path]:
    for base in (SHARED, ROOT / "tests" / "data"):
        yield from sorted(p for p in base.rglob("*.json") if "schema" not in p.name)


def _resources_of(data: Any) -> Iterator[Any]:
    """Resources of a file: FHIR resources and Bundles; a CDS Hooks request's prefetch and draft orders; a
    captured sandbox request's body."""
    if isinstance(data, dict) and isinstance(data.get("body"), dict) and "url_path" in data:
        data = data["body"]
    if isinstance(data, dict) and "resourceType" not in data:
        for key in ("prefetch", "context"):
            inner = data.get(key)
            if isinstance(inner, dict):
                for value in inner.values():
                    if isinstance(value, dict):
                        yield from (r for _, r in iter_resources(value))
        return
    if isinstance(data, list):
        for item in data:
            yield from _resources_of(item)
        return
    yield from (r for _, r in iter_resources(data))


def all_resources() -> list[tuple[str, Any, dict[str, Any]]]:
    """(where, resource, the reference index of its file)."""
    found: list[tuple[str, Any, dict[str, Any]]] = []
    for path in _json_files():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        resources = list(_resources_of(data))
        index = reference_index((None, r) for r in resources)
        found += [(f"{path.name}[{i}]", r, index) for i, r in enumerate(resources)]
    stream = example_stream()
    index = reference_index((None, r) for r in stream)
    found += [(f"example stream[{i}]", r, index) for i, r in enumerate(stream)]
    return found


RESOURCES = all_resources()


def _summary(result: NormalizeResult) -> dict[str, Any]:
    return {
        "outcome": result.outcome,
        "type": result.resource_type,
        "id": result.resource_id,
        "patient": result.patient,
        "reason": result.reason,
        "issues": [(i.severity, i.path, i.message) for i in result.issues],
        "facts": [f.model_dump() for f in result.facts],
        "left_out": left_out_reason(result, PATIENT),
    }


def _both(resource: Any, index: dict[str, Any] | None = None, preliminary: bool = False) -> tuple[Any, Any]:
    full = normalize_leniently(resource, NormalizeOptions(preliminary, PATIENT), resolve=index)
    lean_ = normalize_leniently(resource, NormalizeOptions(preliminary, PATIENT, lean=True), resolve=index)
    return full, lean_


def test_the_data_covers_every_type_the_rules_read() -> None:
    types = {r.get("resourceType") for _, r, _ in RESOURCES if isinstance(r, dict)}
    assert set(lean.READ) - {"Medication"} <= types | {"ServiceRequest"}, set(lean.READ) - types
    assert len(RESOURCES) > 3000


def _rejected_only_unread(full: Any) -> bool:
    """The full path rejected the resource, every error lying in a member no rule reads (at any depth; the
    tolerance layer drops only top-level members it can name). There the lean path may use the resource, or
    leave it out for a reason of its own (e.g. no id instead of an unknown member)."""
    result = full.result
    if result.outcome != "rejected" or not result.issues:
        return False
    for issue in result.issues:
        parts = tuple(int(p) if p.isdigit() else p for p in issue.path.split(".")[1:])
        if not parts or _read_path(result.resource_type, parts):
            return False
    return True


@pytest.mark.parametrize("preliminary", [False, True])
def test_every_real_resource_gives_the_same_facts_both_ways(preliminary: bool) -> None:
    differences, unread = [], set()
    used_lean = 0
    for where, resource, index in RESOURCES:
        full, lean_ = _both(resource, index, preliminary)
        if _summary(full.result) != _summary(lean_.result):
            if _rejected_only_unread(full) and lean_.result.outcome == "rejected":
                unread.add(where)
            else:
                differences.append(where)
        if isinstance(resource, dict) and lean.parse(str(resource.get("resourceType")), resource) is not None:
            used_lean += 1
    assert differences == [], differences[:20]
    # the CDS Hooks spec's prefetch examples with a '...' member ("snipped for brevity") and no id: the full path
    # rejects them for the unknown member, the lean path for the missing id; both leave them out
    assert {w.split("[")[0] for w in unread} <= {
        "HL7_cds-hooks__input_pagecontent_index__10__prefetch.json",
        "cds-hooks_docs__docs_specification_current__07__prefetch.json",
    }
    assert used_lean > 2000  # the lean models do read the data (not everything went the full way)


def test_the_sandbox_draft_order_is_read_lean() -> None:
    """The sandbox's draft MedicationRequest (category an object: invalid R4, in a member no rule reads) is read
    through the lean model at once, with the facts the full path gets after dropping that member."""
    drafts = [
        r
        for w, r, _ in RESOURCES
        if w.startswith("sandbox-")
        and r.get("resourceType") == "MedicationRequest"
        and isinstance(r.get("category"), dict)
    ]
    assert drafts
    for draft in drafts:
        assert lean.parse("MedicationRequest", draft) is not None
        full, lean_ = _both(draft)
        assert full.dropped == ("category",) and lean_.dropped == ()
        assert _summary(full.result) == _summary(lean_.result)


# --- generated variations ---------------------------------------------------------------------------------

ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["2024-03-11", "2024-03-11T06:00:00Z", "2024-13-45", "final", "mmol/L", "", "urn:uuid:x"]),
    st.lists(st.text(max_size=4), max_size=2),
    st.dictionaries(
        st.sampled_from(["code", "system", "value", "text", "reference", "x"]), st.text(max_size=6), max_size=2
    ),
)
SAMPLES = [r for _, r, _ in RESOURCES if isinstance(r, dict) and r.get("resourceType") in lean.READ]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*prefix, key)
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield (*prefix, i)
            yield from _paths(inner, (*prefix, i))


def _set(value: Any, path: tuple[Any, ...], new: Any) -> None:
    for step in path[:-1]:
        value = value[step]
    value[path[-1]] = new


def _read_path(resource_type: str, path: tuple[Any, ...]) -> bool:
    """Whether a lean model reads the member at ``path`` (list indexes skipped)."""
    spec: Any = lean.READ.get(resource_type)
    for step in path:
        if isinstance(step, int):
            continue
        if not isinstance(spec, dict):
            return spec is None  # inside a member read whole
        name = "class_fhir" if step == "class" else step
        if name not in spec:
            return False
        spec = spec[name]
    return True


@st.composite
def variations(draw: Any) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    resource = copy.deepcopy(draw(st.sampled_from(SAMPLES)))
    paths = list(_paths(resource))
    changed = []
    for _ in range(draw(st.integers(1, 3))):
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        try:
            _set(resource, path, draw(ODD))
        except (KeyError, IndexError, TypeError):
            continue
        changed.append(path)
        paths = list(_paths(resource))
    if draw(st.booleans()):  # an unread member with anything in it
        resource[draw(st.sampled_from(["note", "category", "dosageInstruction", "zzUnknown"]))] = draw(ODD)
    return resource, changed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(variations())
def test_generated_variations_keep_the_contract(case: tuple[dict[str, Any], list[tuple[Any, ...]]]) -> None:
    resource, _ = case
    full, lean_ = _both(resource)
    f, s = _summary(full.result), _summary(lean_.result)
    if f == s:
        return
    # The only allowed difference: the full path rejects the resource for something no rule reads (below a
    # member the rules read, or a member tolerance.py cannot drop); the lean path uses it or leaves it out.
    # Never the other way round: where the full path uses a resource, the lean path gives the same facts.
    assert _rejected_only_unread(full), (f, s)
