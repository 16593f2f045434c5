"""Facts from a call's data: the prefetched / fetched resources and the ``draftOrders`` of order hooks.

Both go through the one normaliser (``rules.normalize``), read through the lean models of only the members
the rules read (``rules.lean``, ``EHR_ALERTS_CDS_LEAN_READ``): members the rules do not read (a draft's
``category`` sent as an object, a ``dosageInstruction`` of an odd shape, a ``note``, ...) are neither validated
nor used. A resource the lean model refuses is validated in full and read leniently (``rules.tolerance``):
used without invalid top-level members the rules do not read, else left out with the full path's reason. Draft
MedicationRequests and ServiceRequests become order facts (``rules/valuesets/orders.yaml``), so the rules,
not this service, decide what a draft potassium, diuretic or magnesium order means.

Every resource left out of a call (invalid in a member the rules read, no patient, no id, another patient)
is logged with the reason and counted (``ehr_alerts_cds_resources_left_out_total``); every member dropped by
the full path's lenient reading too (``ehr_alerts_cds_members_tolerated_total``; a resource read lean has
nothing dropped: its unread members were never looked at). Logs carry the resource type, the element path and the
problem without its values, never ids or values. A left-out resource never fails the call.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import orjson

from config.settings import get_settings
from rules.facts import Fact
from rules.normalize import NormalizeOptions, NormalizeResult, iter_resources, reference_index
from rules.tolerance import Lenient, describe, normalize_leniently
from service.cds import metrics

log = logging.getLogger("ehr_alerts.cds")


class NormalizeCache:
    """Normalisation results by resource content (an EHR sends the same resources on every chart open, and
    ``fhir.resources`` validation is most of the cost of a call). Bounded LRU; results are immutable facts."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, bool, bool, bytes], Lenient] = OrderedDict()
        self._lock = threading.Lock()  # calls may be evaluated in worker threads

    def normalize(self, resource: Any, options: NormalizeOptions, index: dict[str, Any], patient: str) -> Lenient:
        """``normalize_leniently`` with the cache; resources that refer to others of the call are not cached."""
        reference = resource.get("medicationReference") if isinstance(resource, dict) else None
        if self.size == 0 or (isinstance(reference, dict) and not str(reference.get("reference", "#")).startswith("#")):
            return normalize_leniently(resource, options, resolve=index)
        try:
            raw = orjson.dumps(resource)
        except (TypeError, orjson.JSONEncodeError):
            return normalize_leniently(resource, options, resolve=index)
        key = (patient, options.include_preliminary, options.lean, raw)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        result = normalize_leniently(resource, options, resolve=index, raw=raw)  # serialised once per resource
        with self._lock:
            self._items[key] = result
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return result


def left_out_reason(result: NormalizeResult, patient: str) -> str | None:
    """Why a resource's facts are not used for ``patient`` (None: they are, or it holds nothing the rules
    read): invalid, no-patient, no-id, other-patient or not-a-resource."""
    if result.outcome == "accepted":
        return "other-patient" if result.patient != patient else None
    if result.outcome != "rejected":
        return None
    if result.resource_type == "?":
        return "not-a-resource"
    path = result.issues[0].path if result.issues else ""
    if path.endswith(".subject"):
        return "no-patient"
    if path.endswith(".id") and "no id" in (result.reason or ""):
        return "no-id"
    return "invalid"


def _report(lenient: Lenient, patient: str) -> None:
    """Log and count what was left out of, or tolerated in, one resource (no ids, no values)."""
    result = lenient.result
    if lenient.dropped:
        problems = [dict(zip(("path", "problem"), describe(i), strict=True)) for i in lenient.tolerated]
        log.info(
            "resource of a CDS call used without invalid members the rules do not read",
            extra={"resource_type": result.resource_type, "members": list(lenient.dropped), "problems": problems},
        )
        metrics.record_tolerated(result.resource_type, lenient.dropped)
    reason = left_out_reason(result, patient)
    if reason is None:
        return
    issue = result.issues[0] if result.issues else None
    path, problem = describe(issue) if issue else ("", "belongs to another patient than context.patientId")
    log.warning(
        "resource left out of a CDS call",
        extra={"resource_type": result.resource_type, "reason": reason, "path": path, "problem": problem},
    )
    metrics.record_left_out(result.resource_type, reason)


def facts_from(
    resources: Iterable[Any], patient: str, include_preliminary: bool, cache: NormalizeCache | None = None
) -> list[Fact]:
    """Facts of the patient's resources (Bundles walked); what is left out is logged and counted."""
    lean = get_settings().cds_lean_read
    options = NormalizeOptions(include_preliminary=include_preliminary, default_patient=patient, lean=lean)
    pairs = [pair for item in resources for pair in iter_resources(item)]
    # Only a medicationReference to another resource of the call needs the index of the call's resources.
    needs_index = any(isinstance(r, dict) and "medicationReference" in r for _, r in pairs)
    index = reference_index(pairs) if needs_index else {}
    cache = cache or NormalizeCache(0)
    facts: list[Fact] = []
    for _, resource in pairs:
        lenient = cache.normalize(resource, options, index, patient)
        if lenient.dropped or lenient.result.outcome != "ignored":
            _report(lenient, patient)
        if lenient.result.outcome == "accepted":
            facts.extend(f for f in lenient.result.facts if f.patient == patient)
    return facts


def draft_order_facts(
    draft_orders: dict[str, Any] | None, patient: str, cache: NormalizeCache | None = None
) -> list[Fact]:
    """Facts of the draft orders of an order-select / order-sign call."""
    if not draft_orders:
        return []
    return facts_from([draft_orders], patient, include_preliminary=False, cache=cache)
