"""Builders for the CDS Hooks tests: clinical scenarios relative to the wall clock (a CDS call evaluates as of
now), prefetch built from the service's own templates, hook requests, the derived 2.0.1 JSON Schema."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from fhir_builders import (
    FUROSEMIDE,
    ago,
    bundle,
    condition,
    magnesium,
    med_request,
    med_statement,
    potassium,
    rxnorm,
)
from loopback_fhir import matches

from service.cds.services import PrefetchQuery, prefetch_queries, substitute
from workers.pipeline import get_catalog

SCHEMA = Path(__file__).resolve().parent / "data" / "cds-hooks-spec" / "cds-hooks-2.0.1.derived.schema.json"
HYPOK = "hypokalemia-without-magnesium"
REFRACTORY = "refractory-hypokalemia-on-diuretic"
ARRHYTHMIA = "arrhythmia-with-low-magnesium"
RULES = (HYPOK, REFRACTORY, ARRHYTHMIA)
HOOKS = ("patient-view", "order-select", "order-sign")
SERVICE = {hook: f"mg-k-{hook}" for hook in HOOKS}
EXPECTED = {HYPOK: "info", REFRACTORY: "warning", ARRHYTHMIA: "critical"}
TOKEN = "fhir-access-token-do-not-log"
KCL = rxnorm("8591", "potassium chloride")
MGSO4 = rxnorm("6585", "magnesium sulfate")


def now() -> datetime:
    """The wall clock (CDS calls are evaluated as of the moment they arrive)."""
    return datetime.now(UTC)


def h(hours: float) -> str:
    """FHIR dateTime ``hours`` ago."""
    return ago(hours, now=now())


def scenario(rule: str | None, patient: str) -> list[dict[str, Any]]:
    """Resources of a patient for whom exactly ``rule`` fires (None: nothing fires)."""
    p = {"patient": patient}
    if rule == HYPOK:
        return [potassium(3.1, at=h(4), **p), med_statement(rxnorm("197361", "amlodipine"), start="2024-01-01", **p)]
    if rule == REFRACTORY:
        return [
            med_statement(FUROSEMIDE, start=h(24 * 30)[:10], **p),
            potassium(3.2, at=h(40), **p),
            potassium(3.3, at=h(4), **p),
            magnesium(0.60, at=h(10), **p),  # low, no Mg therapy since: Mg can still explain it
        ]
    if rule == ARRHYTHMIA:  # a recent AF diagnosis with Mg below 0.5 mmol/L (a critical card)
        return [magnesium(0.45, at=h(5), **p), potassium(4.1, at=h(5), **p), condition(onset=h(24), **p)]
    return [potassium(4.2, at=h(6), **p), magnesium(0.85, at=h(6), **p)]


@cache
def queries() -> tuple[PrefetchQuery, ...]:
    """The prefetch keys the services advertise."""
    return prefetch_queries([r for r in get_catalog().rules if r.status == "active"])


def searchset(resources: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A searchset Bundle."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": r} for r in resources],
        **extra,
    }


def prefetch_for(
    resources: list[dict[str, Any]], patient: str, keys: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The prefetch an EHR would send: each advertised template run over ``resources`` (all keys by default)."""
    tokens = {"context.patientId": patient}
    out = {}
    for query in queries():
        if keys is not None and query.key not in keys:
            continue
        params = [(name, substitute(value, tokens)) for name, value in query.params]
        out[query.key] = searchset([r for r in resources if matches(r, query.resource_type, params)])
    return out


def draft_orders(*resources: dict[str, Any]) -> dict[str, Any]:
    """A draftOrders Bundle."""
    return bundle(*resources)


def draft_kcl(patient: str, id: str = "draft-kcl") -> dict[str, Any]:
    """A draft potassium chloride order."""
    return med_request(KCL, status="draft", authored=None, patient=patient, id=id)


def hook_request(
    hook: str,
    patient: str,
    prefetch: dict[str, Any] | None = None,
    *,
    fhir_server: str | None = None,
    token: str | None = TOKEN,
    orders: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A CDS Hooks call body; order hooks get ``orders`` (default: a draft KCl) as draftOrders."""
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": patient}
    if hook != "patient-view":
        drafts = orders if orders is not None else [draft_kcl(patient)]
        context["draftOrders"] = draft_orders(*drafts)
        if hook == "order-select":
            context["selections"] = [f"{drafts[0]['resourceType']}/{drafts[0]['id']}"]
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if fhir_server:
        body["fhirServer"] = fhir_server
        if token:
            body["fhirAuthorization"] = {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/*.read",
                "subject": "ehr-alerts",
            }
    if prefetch is not None:
        body["prefetch"] = prefetch
    body.update(extra)
    return body


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema derived from the CDS Hooks 2.0.1 text."""
    return json.loads(SCHEMA.read_text())


def validate(instance: Any, definition: str) -> None:
    """Validate against one definition of the derived schema (e.g. ServiceResponse, DiscoveryResponse)."""
    root = schema()
    defs = root.get("$defs") or root.get("definitions") or {}
    assert definition in defs, sorted(defs)
    ref = "#/$defs/" if "$defs" in root else "#/definitions/"
    jsonschema.validate(instance, {**root, "$ref": ref + definition})


def empty_members(value: Any, path: str = "$") -> list[str]:
    """Paths of null / empty members (CDS Hooks: none allowed except ``cards`` / ``services``)."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            if v in (None, "", [], {}) and k not in ("cards", "services"):
                found.append(f"{path}.{k}")
            found += empty_members(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if v in (None, "", [], {}):
                found.append(f"{path}[{i}]")
            found += empty_members(v, f"{path}[{i}]")
    return found
