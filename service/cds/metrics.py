"""Prometheus metrics of the CDS Hooks data path (on the API's registry, served at ``GET /metrics``).

Labels come from fixed vocabularies only: resource types the rules read (else ``other``), FHIR element
names of that type (else ``other``), the service's own prefetch keys, the kinds of gap and the catalog's
rule ids. Never ids, values or anything else a client sent.
"""

from __future__ import annotations

from functools import cache

from fhir.resources.R4B import get_fhir_model_class
from prometheus_client import Counter

from rules.normalize import SUPPORTED_TYPES
from service.cds.fhir_client import GAP_CODES
from service.observability.metrics import registry

LEFT_OUT_REASONS = frozenset({"invalid", "no-patient", "no-id", "other-patient", "not-a-resource"})

RESOURCES_LEFT_OUT = Counter(
    "ehr_alerts_cds_resources_left_out",
    "Resources of CDS Hooks calls (prefetch, fetched, draft orders) not used, by resource type and reason",
    ["resource_type", "reason"],
    registry=registry,
)
MEMBERS_TOLERATED = Counter(
    "ehr_alerts_cds_members_tolerated",
    "Invalid members the rules do not read, dropped so that the rest of the resource is used (rules/tolerance.py)",
    ["resource_type", "member"],
    registry=registry,
)
DATA_GAPS = Counter(
    "ehr_alerts_cds_prefetch_gaps",
    "Prefetch keys a CDS Hooks call could not (fully) have, by key and kind of failure",
    ["key", "kind"],
    registry=registry,
)
RULES_UNCHECKED = Counter(
    "ehr_alerts_cds_rules_unchecked",
    "Rules a CDS Hooks call could not check on its own data because a key they read was missing",
    ["rule"],
    registry=registry,
)


def _type_label(resource_type: str) -> str:
    return resource_type if resource_type in SUPPORTED_TYPES else "other"


@cache
def _elements(resource_type: str) -> frozenset[str]:
    fields = get_fhir_model_class(resource_type).model_fields
    return frozenset(field.alias or name for name, field in fields.items())


def record_left_out(resource_type: str, reason: str) -> None:
    """Count a resource left out of a call."""
    RESOURCES_LEFT_OUT.labels(_type_label(resource_type), reason if reason in LEFT_OUT_REASONS else "invalid").inc()


def record_tolerated(resource_type: str, members: tuple[str, ...]) -> None:
    """Count the members dropped from a resource that was then used."""
    kind = _type_label(resource_type)
    known = _elements(kind) if kind != "other" else frozenset()
    for member in members:
        MEMBERS_TOLERATED.labels(kind, member if member in known else "other").inc()


def record_gap(key: str, kind: str, known_keys: frozenset[str]) -> None:
    """Count a prefetch key that could not (fully) be had."""
    DATA_GAPS.labels(key if key in known_keys else "other", kind if kind in GAP_CODES else "other").inc()


def record_unchecked(rule_id: str) -> None:
    """Count a rule a call could not check (rule ids come from the loaded catalog)."""
    RULES_UNCHECKED.labels(rule_id).inc()
