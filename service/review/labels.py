"""Words people read for the codes the data uses: statuses, status groups, actions, sources, concepts.

Concept names come from the value sets' own ``display`` (rules/valuesets), so a new concept needs no code here.
"""

from __future__ import annotations

from functools import cache

from rules.datafiles import load_valueset

#: status -> (label, what it means); also the page's help text
STATUS_LABELS: dict[str, tuple[str, str]] = {
    "active": ("Active", "new or escalated: needs a pharmacist"),
    "acknowledged": ("Acknowledged", "seen by a pharmacist, nothing decided yet"),
    "accepted": ("Accepted", "the recommendation was taken: a card suggestion accepted in the EHR, or Accept here"),
    "overridden": ("Overridden", "a person decided not to follow it, with a reason"),
    "snoozed": ("Snoozed", "hidden until a time; escalation brings it back early"),
    "resolved": ("Resolved", "its resolve condition was met, or a person resolved it"),
    "retracted": ("Retracted", "its source data was entered in error or deleted"),
    "expired": ("Expired", "its evidence aged out of the rule's look-back"),
    "withdrawn": ("Withdrawn", "the rule stopped firing for another reason (a corrected result, a stopped order)"),
}
BUCKET_LABELS: dict[str, str] = {
    "todo": "To do",
    "open": "Open (any)",
    "closed": "Closed (any)",
    "all": "All",
}
ACTION_LABELS: dict[str, str] = {
    "acknowledge": "Acknowledge",
    "accept": "Accept",
    "override": "Override",
    "snooze": "Snooze",
    "resolve": "Resolve",
    "reopen": "Reopen",
}
HISTORY_LABELS: dict[str, str] = {
    "opened": "Raised",
    "updated": "Updated",
    "escalated": "Escalated",
    "resolved": "Resolved",
    "retracted": "Retracted",
    "expired": "Expired",
    "withdrawn": "Withdrawn",
    "acknowledge": "Acknowledged",
    "accept": "Accepted",
    "override": "Overridden",
    "snooze": "Snoozed",
    "resolve": "Resolved by hand",
    "reopen": "Reopened",
    "recorded": "Recorded",
}
SOURCE_LABELS: dict[str, str] = {"stream": "Lab/medication feed", "cds-hooks": "EHR (CDS Hooks call)"}
ENCOUNTER_CLASSES: dict[str, str] = {  # HL7 v3 ActCode, the classes FHIR R4 Encounter.class uses
    "IMP": "Inpatient",
    "EMER": "Emergency",
    "OBSENC": "Observation",
    "SS": "Short stay",
    "AMB": "Ambulatory",
    "VR": "Virtual",
    "HH": "Home health",
}


def status_label(status: str | None) -> str:
    """``Overridden``; an unknown status as it is."""
    return STATUS_LABELS.get(status or "", (status or "—", ""))[0]


def bucket_label(bucket: str) -> str:
    """A status or status group as the filter bar shows it."""
    return BUCKET_LABELS.get(bucket) or status_label(bucket)


def history_label(action: str | None) -> str:
    """A history entry's action in words (``override`` -> ``Overridden``)."""
    return HISTORY_LABELS.get(action or "", (action or "").replace("-", " ").capitalize())


def encounter_label(code: str | None) -> str:
    """``IMP`` -> ``Inpatient``; other codes as they are."""
    return ENCOUNTER_CLASSES.get(code or "", code or "")


@cache
def _concept_names() -> dict[str, str]:
    names: dict[str, str] = {}
    for concept, entry in (load_valueset("labs").get("concepts") or {}).items():
        names[concept] = entry.get("display") or concept
    for concept, entry in (load_valueset("medications").get("classes") or {}).items():
        names[concept] = entry.get("display") or concept
    for concept, entry in (load_valueset("orders").get("concepts") or {}).items():
        names[concept] = entry.get("display") or concept
    return names


def concept_label(concept: str | None) -> str:
    """The value set's name of a concept (``potassium`` -> ``Potassium, serum/plasma/blood``)."""
    if not concept:
        return ""
    return _concept_names().get(concept) or concept.replace("-", " ").capitalize()


def short_concept(concept: str | None) -> str:
    """The first part of a concept's name (``Potassium``, ``Loop diuretic``), for tables and headlines."""
    return concept_label(concept).split(",")[0].split(" (")[0]
