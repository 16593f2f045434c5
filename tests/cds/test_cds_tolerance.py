"""Lenient reading (rules/tolerance.py) and what a CDS call does with resources it leaves out or tolerates.

The read lists are checked against the normaliser on real data: dropping every member outside them changes
no fact of any resource of the shared public data, the example stream or the captured sandbox requests, and
an invalid value in any such member never changes the facts (each member of each resource type, in turn).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cds_support import example_stream, sandbox, sandbox_files
from fhir_builders import FUROSEMIDE, med_request, potassium, shared_data_dir

from rules.normalize import SUPPORTED_TYPES, Issue, NormalizeOptions, iter_resources, normalize_resource
from rules.tolerance import NEVER_DROPPED, READ_MEMBERS, describe, droppable, is_read, normalize_leniently
from service.cds import metrics
from service.cds.orders import facts_from
from service.observability.metrics import registry

OPTIONS = NormalizeOptions(default_patient="p1")
JUNK: list[Any] = [{"junk": True}, "x", [1, {"a": None}], 12]


def _facts(result: Any) -> list[dict[str, Any]]:
    return [f.model_dump() for f in result.facts] if result.outcome == "accepted" else []


def _sandbox_resources() -> Iterator[dict[str, Any]]:
    for path in sandbox_files():
        body = json.loads(path.read_text())["body"]
        for value in [*(body.get("prefetch") or {}).values(), (body.get("context") or {}).get("draftOrders")]:
            if value:
                yield from (r for _, r in iter_resources(value))


def _shared_resources(per_file: int = 150) -> Iterator[dict[str, Any]]:
    root = shared_data_dir()
    for folder in ("fhir-r4-examples", "synthea-r4"):
        for path in sorted((root / folder).glob("*.json")):
            found = 0
            for _, resource in iter_resources(json.loads(path.read_text())):
                if isinstance(resource, dict) and resource.get("resourceType") in SUPPORTED_TYPES:
                    yield resource
                    found += 1
                    if found >= per_file:
                        break


def real_resources() -> list[dict[str, Any]]:
    """Resources of the types the rules read from every real source the tests have."""
    pool = [*_shared_resources(), *example_stream(), *_sandbox_resources()]
    return [r for r in pool if isinstance(r, dict) and r.get("resourceType") in SUPPORTED_TYPES]


def _unread(resource: dict[str, Any]) -> dict[str, Any]:
    kind = resource["resourceType"]
    return {k: v for k, v in resource.items() if is_read(kind, k) or k.removeprefix("_") in NEVER_DROPPED}


# --- the read lists against the normaliser --------------------------------------------------------------


def test_every_type_the_rules_read_has_a_read_list() -> None:
    assert set(READ_MEMBERS) == set(SUPPORTED_TYPES)


def test_dropping_every_member_the_rules_do_not_read_changes_no_fact_on_real_data() -> None:
    resources = real_resources()
    used = 0
    for resource in resources:
        full = normalize_leniently(resource, OPTIONS).result
        if full.outcome != "accepted":
            continue
        used += 1
        trimmed = normalize_resource(_unread(resource), OPTIONS)
        assert _facts(trimmed) == _facts(full), (resource["resourceType"], resource.get("id"))
    assert used >= 100, used  # the data exercises every type with facts


def _samples() -> list[dict[str, Any]]:
    """One resource with facts per type: the example stream, plus a ServiceRequest."""
    by_type: dict[str, dict[str, Any]] = {}
    for resource in example_stream():
        kind = resource["resourceType"]
        if kind in SUPPORTED_TYPES and kind not in by_type and normalize_resource(resource).facts:
            by_type[kind] = resource
    by_type["Encounter"] = {
        "resourceType": "Encounter",
        "id": "enc1",
        "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2024-03-10T06:00:00Z"},
        "location": [{"location": {"display": "Ward 5"}}],
    }
    by_type["Procedure"] = {
        "resourceType": "Procedure",
        "id": "hd1",
        "status": "completed",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "302497006"}]},
        "subject": {"reference": "Patient/p1"},
        "performedDateTime": "2024-03-10T08:00:00Z",
    }
    by_type["ServiceRequest"] = {
        "resourceType": "ServiceRequest",
        "id": "sr1",
        "status": "active",
        "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2601-3"}]},
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2024-03-11T06:00:00Z",
    }
    return list(by_type.values())


@pytest.mark.parametrize("resource", _samples(), ids=lambda r: r["resourceType"])
def test_an_invalid_value_in_any_member_the_rules_do_not_read_never_changes_the_facts(resource: dict[str, Any]) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    kind = resource["resourceType"]
    expected = _facts(normalize_resource(resource, OPTIONS))
    assert expected
    members = sorted(
        f.alias or name
        for name, f in get_fhir_model_class(kind).model_fields.items()
        if not is_read(kind, f.alias or name) and (f.alias or name).removeprefix("_") not in NEVER_DROPPED
    )
    assert "category" in members or kind in ("Condition", "ServiceRequest", "Patient", "Encounter")
    for member in [*members, "unknownMember"]:
        for junk in JUNK:
            slipped = {**copy.deepcopy(resource), member: junk}
            lenient = normalize_leniently(slipped, OPTIONS)
            assert _facts(lenient.result) == expected, (kind, member, junk, lenient.result.issues)


# --- what is tolerated and what is not -----------------------------------------------------------------


def _draft(**changes: Any) -> dict[str, Any]:
    draft = med_request(FUROSEMIDE, status="draft", authored=None, patient="p1", id="draft-1")
    return {**draft, **changes}


def test_the_sandbox_draft_with_a_category_object_is_used_without_its_category() -> None:
    captured = sandbox("sandbox-d-03-order-select.json")["body"]["context"]["draftOrders"]["entry"][0]["resource"]
    assert normalize_resource(captured, NormalizeOptions(default_patient="ex-bravo")).outcome == "rejected"
    lenient = normalize_leniently(captured, NormalizeOptions(default_patient="ex-bravo"))
    assert lenient.result.outcome == "accepted" and lenient.dropped == ("category",)
    assert {f.concept for f in lenient.result.facts} == {"diuretic-order", "loop-diuretic"}
    assert [describe(i) for i in lenient.tolerated] == [("MedicationRequest.category", "Input should be a valid list")]


@pytest.mark.parametrize(
    ("changes", "dropped"),
    [
        ({"category": {"text": "x"}, "note": {"text": "Jane Doe"}}, ("category", "note")),
        ({"dosageInstruction": [{"timing": "daily"}], "_category": 5}, ("category", "dosageInstruction")),
        ({"reasonCode": "hypokalaemia", "extension": {"url": 1}}, ("extension", "reasonCode")),
        ({"vendorMember": {"a": 1}}, ("vendorMember",)),
    ],
)
def test_invalid_unread_members_are_dropped(changes: dict[str, Any], dropped: tuple[str, ...]) -> None:
    lenient = normalize_leniently(_draft(**changes), OPTIONS)
    assert lenient.result.outcome == "accepted" and sorted(lenient.dropped) == sorted(dropped)
    assert _facts(lenient.result) == _facts(normalize_resource(_draft(), OPTIONS))


@pytest.mark.parametrize(
    "changes",
    [
        {"status": "drafty"},  # a read member with a bad code
        {"medicationCodeableConcept": {"coding": "x"}},  # the drug itself
        {"subject": "Patient/p1"},
        {"authoredOn": "yesterday"},
        {"category": {"text": "x"}, "intent": 5},  # one read member is enough to refuse
        {"modifierExtension": {"url": "x"}},  # a modifier may change the meaning of everything else
    ],
)
def test_invalid_read_members_and_modifiers_keep_the_resource_rejected(changes: dict[str, Any]) -> None:
    lenient = normalize_leniently(_draft(**changes), OPTIONS)
    assert lenient.result.outcome == "rejected" and lenient.dropped == ()


def test_droppable_refuses_issues_without_a_member_and_unknown_types() -> None:
    assert droppable("Observation", [Issue("error", "Observation", "invalid Observation")]) is None
    assert droppable("Patient", [Issue("error", "Patient.name", "bad")]) is None
    assert droppable("Observation", [Issue("warning", "Observation.code", "odd")]) is None  # nothing to drop
    assert droppable("Observation", [Issue("error", "Observation.note.0", "bad")]) == ("note",)


def test_describe_keeps_paths_and_drops_values() -> None:
    issue = Issue("error", "MedicationRequest.status", "MedicationRequest.status 'Jane Doe' is not one of [a, b]")
    assert describe(issue) == ("MedicationRequest.status", "MedicationRequest.status … is not one of …")
    assert describe(Issue("error", "Observation.Jane Doe.0", "Extra inputs are not permitted (at x)")) == (
        "Observation.?.0",
        "Extra inputs are not permitted",
    )


# --- a CDS call: every resource left out is logged with its reason and counted; no PHI -------------------


def _sample(name: str, labels: dict[str, str]) -> float:
    return registry.get_sample_value(f"{name}_total", labels) or 0.0


@pytest.mark.parametrize("lean", [False, True], ids=["full", "lean"])
def test_left_out_and_tolerated_resources_are_logged_and_counted_without_values(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    """Full reading (EHR_ALERTS_CDS_LEAN_READ=false): the invalid unread members are dropped, logged and counted.
    Lean reading (the default, issue 15): they are never looked at, so nothing is dropped; what is left out is
    left out for the same reasons either way."""
    from config.settings import get_settings

    monkeypatch.setenv("EHR_ALERTS_CDS_LEAN_READ", str(lean).lower())
    get_settings.cache_clear()
    phi = "Jane Q Patient MRN-000123"
    resources = [
        potassium(3.1, at="2024-03-11T06:00:00Z", patient="p1", id="k1"),
        {**potassium(3.0, at="2024-03-11T07:00:00Z", patient="p1", id="k2"), "status": phi},  # read member
        potassium(3.2, at="2024-03-11T07:00:00Z", patient="other", id="k3"),  # another patient
        {k: v for k, v in potassium(3.3, at="2024-03-11T07:00:00Z", patient="p1").items() if k != "id"},
        _draft(note={"text": phi}, category={"text": phi}),  # tolerated
    ]
    left_invalid = {"resource_type": "Observation", "reason": "invalid"}
    tolerated = {"resource_type": "MedicationRequest", "member": "note"}
    before = (
        _sample("ehr_alerts_cds_resources_left_out", left_invalid),
        _sample("ehr_alerts_cds_members_tolerated", tolerated),
    )
    with caplog.at_level(logging.INFO, logger="ehr_alerts.cds"):
        facts = facts_from(resources, "p1", include_preliminary=False)
    assert {f.resource_id for f in facts} == {"k1", "draft-1"}
    left = [r for r in caplog.records if r.getMessage() == "resource left out of a CDS call"]
    assert sorted(r.reason for r in left) == ["invalid", "no-id", "other-patient"]  # type: ignore[attr-defined]
    invalid = next(r for r in left if r.reason == "invalid")  # type: ignore[attr-defined]
    assert (invalid.resource_type, invalid.path) == ("Observation", "Observation.status")  # type: ignore[attr-defined]
    used = [r for r in caplog.records if r.getMessage().startswith("resource of a CDS call used without")]
    assert [sorted(r.members) for r in used] == ([] if lean else [["category", "note"]])  # type: ignore[attr-defined]
    assert all(phi not in json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert _sample("ehr_alerts_cds_resources_left_out", left_invalid) == before[0] + 1
    assert _sample("ehr_alerts_cds_members_tolerated", tolerated) == before[1] + (0 if lean else 1)
    get_settings.cache_clear()
    assert _sample("ehr_alerts_cds_resources_left_out", {"resource_type": "Observation", "reason": "other-patient"})


def test_metric_labels_stay_in_their_vocabularies() -> None:
    metrics.record_left_out("Jane Doe", "whatever")
    metrics.record_tolerated("MedicationRequest", ("Jane Doe",))
    assert _sample("ehr_alerts_cds_resources_left_out", {"resource_type": "other", "reason": "invalid"}) >= 1
    assert _sample("ehr_alerts_cds_members_tolerated", {"resource_type": "MedicationRequest", "member": "other"}) >= 1


def test_the_docs_list_the_same_read_members() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cds-hooks.md").read_text()
    for kind, members in READ_MEMBERS.items():
        line = next((row for row in docs.splitlines() if row.startswith(f"| {kind} |")), "")
        assert line, f"docs/cds-hooks.md has no read-members row for {kind}"
        assert {m.strip(" `") for m in line.split("|")[2].split(",")} == set(members), kind
