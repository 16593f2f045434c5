"""Facts from a call's data: the prefetched / fetched resources and the ``draftOrders`` of order hooks.

Both go through the one normaliser (``rules.normalize``); draft MedicationRequests and ServiceRequests become
order facts there (``rules/valuesets/orders.yaml``), so the rules, not this service, decide what a draft
potassium, diuretic or magnesium order means. A draft order that is not valid FHIR is left out (it cannot
be evaluated) and counted in the log; it never fails the call.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import orjson

from rules.facts import Fact
from rules.normalize import NormalizeOptions, NormalizeResult, iter_resources, normalize_resource, reference_index

log = logging.getLogger("ehr_alerts.cds")


class NormalizeCache:
    """Normalisation results by resource content (an EHR sends the same resources on every chart open, and
    ``fhir.resources`` validation is most of the cost of a call). Bounded LRU; results are immutable facts."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, bool, bytes], NormalizeResult] = OrderedDict()
        self._lock = threading.Lock()  # calls are evaluated in worker threads

    def normalize(
        self, resource: Any, options: NormalizeOptions, index: dict[str, Any], patient: str
    ) -> NormalizeResult:
        """``normalize_resource`` with the cache; resources that refer to others of the call are not cached."""
        reference = resource.get("medicationReference") if isinstance(resource, dict) else None
        if self.size == 0 or (isinstance(reference, dict) and not str(reference.get("reference", "#")).startswith("#")):
            return normalize_resource(resource, options, resolve=index)
        try:
            key = (patient, options.include_preliminary, orjson.dumps(resource))
        except (TypeError, orjson.JSONEncodeError):
            return normalize_resource(resource, options, resolve=index)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        result = normalize_resource(resource, options, resolve=index)
        with self._lock:
            self._items[key] = result
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return result


def facts_from(
    resources: Iterable[Any], patient: str, include_preliminary: bool, cache: NormalizeCache | None = None
) -> list[Fact]:
    """Facts of the patient's resources (Bundles walked); other patients' and invalid resources are left out."""
    options = NormalizeOptions(include_preliminary=include_preliminary, default_patient=patient)
    pairs = [pair for item in resources for pair in iter_resources(item)]
    # Only a medicationReference to another resource of the call needs the index of the call's resources.
    needs_index = any(isinstance(r, dict) and "medicationReference" in r for _, r in pairs)
    index = reference_index(pairs) if needs_index else {}
    cache = cache or NormalizeCache(0)
    results = [cache.normalize(resource, options, index, patient) for _, resource in pairs]
    rejected = sum(1 for r in results if r.outcome == "rejected")
    if rejected:
        log.info("resources left out of a CDS call", extra={"rejected": rejected})
    return [f for r in results if r.outcome == "accepted" for f in r.facts if f.patient == patient]


def draft_order_facts(draft_orders: dict[str, Any] | None, patient: str) -> list[Fact]:
    """Facts of the draft orders of an order-select / order-sign call."""
    if not draft_orders:
        return []
    return facts_from([draft_orders], patient, include_preliminary=False)
