"""Validation of a CDS Hooks 2.0.1 service call (the body of ``POST /cds-services/{id}``).

Unknown members (``extension`` and anything newer) are ignored. Error messages name the member and the
problem and never echo values (the body may carry an access token).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.cds.errors import CdsError

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")
USER_TYPES = {
    "patient-view": ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson"),
    "order-select": ("Practitioner", "PractitionerRole"),
    "order-sign": ("Practitioner", "PractitionerRole"),
}


@dataclass
class HookRequest:
    """A validated CDS Hooks call."""

    hook: str
    hook_instance: str
    patient_id: str
    user_id: str
    encounter_id: str | None
    fhir_server: str | None
    access_token: str | None = field(repr=False)  # never logged, never stored
    prefetch: dict[str, Any]
    draft_orders: dict[str, Any] | None = None
    selections: list[str] = field(default_factory=list)

    def tokens(self) -> dict[str, str]:
        """Values of the CDS Hooks 2.0 prefetch tokens for this call."""
        tokens = {"context.patientId": self.patient_id, "context.userId": self.user_id}
        if self.encounter_id:
            tokens["context.encounterId"] = self.encounter_id
        kind, _, ident = self.user_id.partition("/")
        names = {
            "Practitioner": "userPractitionerId",
            "PractitionerRole": "userPractitionerRoleId",
            "Patient": "userPatientId",
            "RelatedPerson": "userRelatedPersonId",
        }
        if kind in names:
            tokens[names[kind]] = ident
        return tokens


def _need(data: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in data or data[name] is None:
        raise CdsError(400, f"{where}{name} is required", f"{where}{name}", "required")
    return data[name]


def _string(data: Mapping[str, Any], name: str, where: str = "", required: bool = True) -> str | None:
    value = _need(data, name, where) if required else data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CdsError(400, f"{where}{name} must be a non-empty string", f"{where}{name}")
    return value


def parse_request(data: Any, expected_hook: str) -> HookRequest:
    """Validate a call for a service of ``expected_hook``; raise CdsError(400) naming the problem."""
    if not isinstance(data, Mapping):
        raise CdsError(400, "the request body must be a JSON object", code="structure")
    hook = _string(data, "hook")
    if hook != expected_hook:
        raise CdsError(400, f"hook {hook!r} does not match this service (it answers {expected_hook!r})", "hook")
    hook_instance = _string(data, "hookInstance")
    try:
        uuid.UUID(str(hook_instance))
    except ValueError:
        raise CdsError(400, "hookInstance must be a UUID", "hookInstance") from None
    fhir_server = _string(data, "fhirServer", required=False)
    if fhir_server is not None and not re.match(r"^https?://[^\s/?#]+", fhir_server):
        raise CdsError(400, "fhirServer must be an absolute http(s) URL", "fhirServer")
    access_token = _authorization(data.get("fhirAuthorization"), fhir_server)
    context = _need(data, "context", "")
    if not isinstance(context, Mapping):
        raise CdsError(400, "context must be a JSON object", "context")
    user_id = _string(context, "userId", "context.")
    assert user_id is not None
    user = REFERENCE.match(user_id)
    if user is None or user.group(1) not in USER_TYPES[expected_hook]:
        allowed = ", ".join(USER_TYPES[expected_hook])
        raise CdsError(400, f"context.userId must be a reference Type/id with Type one of {allowed}", "context.userId")
    patient_id = _string(context, "patientId", "context.")
    if not FHIR_ID.match(patient_id or ""):
        raise CdsError(400, "context.patientId must be a FHIR id (letters, digits, '-', '.')", "context.patientId")
    encounter_id = _string(context, "encounterId", "context.", required=False)
    prefetch = data.get("prefetch")
    if prefetch is not None and not isinstance(prefetch, Mapping):
        raise CdsError(400, "prefetch must be a JSON object", "prefetch")
    request = HookRequest(
        hook=expected_hook,
        hook_instance=str(hook_instance),
        patient_id=str(patient_id),
        user_id=user_id,
        encounter_id=encounter_id,
        fhir_server=fhir_server.rstrip("/") if fhir_server else None,
        access_token=access_token,
        prefetch=dict(prefetch or {}),
    )
    if expected_hook in ("order-select", "order-sign"):
        request.draft_orders = _draft_orders(context)
    if expected_hook == "order-select":
        request.selections = _selections(context, request.draft_orders or {})
    return request


def _authorization(value: Any, fhir_server: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise CdsError(400, "fhirAuthorization must be a JSON object", "fhirAuthorization")
    if fhir_server is None:
        raise CdsError(400, "fhirAuthorization requires fhirServer", "fhirServer", "required")
    token = _string(value, "access_token", "fhirAuthorization.")
    token_type = _string(value, "token_type", "fhirAuthorization.")
    if (token_type or "").lower() != "bearer":
        raise CdsError(400, "fhirAuthorization.token_type must be Bearer", "fhirAuthorization.token_type")
    expires_in = _need(value, "expires_in", "fhirAuthorization.")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool):
        raise CdsError(400, "fhirAuthorization.expires_in must be an integer", "fhirAuthorization.expires_in")
    # 2.0.1 §Calling a CDS Service: scope and subject are REQUIRED, patient (CONDITIONAL) is a FHIR id.
    _string(value, "scope", "fhirAuthorization.")
    _string(value, "subject", "fhirAuthorization.")
    _string(value, "patient", "fhirAuthorization.", required=False)
    return token


def _draft_orders(context: Mapping[str, Any]) -> dict[str, Any]:
    bundle = _need(context, "draftOrders", "context.")
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise CdsError(400, "context.draftOrders must be a FHIR Bundle", "context.draftOrders")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise CdsError(400, "context.draftOrders.entry must be an array", "context.draftOrders.entry")
    for i, entry in enumerate(entries):
        where = f"context.draftOrders.entry[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("resource"), Mapping):
            raise CdsError(400, f"{where} must hold a resource", f"{where}.resource")
        if not isinstance(entry["resource"].get("resourceType"), str):
            raise CdsError(400, f"{where}.resource has no resourceType", f"{where}.resource.resourceType")
    return dict(bundle)


def _selections(context: Mapping[str, Any], draft_orders: Mapping[str, Any]) -> list[str]:
    selections = _need(context, "selections", "context.")
    if not isinstance(selections, list) or not selections:
        raise CdsError(400, "context.selections must be a non-empty array", "context.selections")
    present = {f"{e['resource'].get('resourceType')}/{e['resource'].get('id')}" for e in draft_orders.get("entry", [])}
    for i, item in enumerate(selections):
        if not isinstance(item, str) or "/" not in item:
            raise CdsError(400, f"context.selections[{i}] must be a Type/id reference", f"context.selections[{i}]")
        if item not in present:
            raise CdsError(
                400, f"context.selections[{i}] does not name an entry of draftOrders", f"context.selections[{i}]"
            )
    return list(selections)
