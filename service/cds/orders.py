"""Facts from a call's data: the prefetched / fetched resources and the ``draftOrders`` of order hooks.

Both go through the one normaliser (``rules.normalize``); draft MedicationRequests and ServiceRequests become
order facts there (``rules/valuesets/orders.yaml``), so the rules, not this service, decide what a draft
potassium, diuretic or magnesium order means. A draft order that is not valid FHIR is left out (it cannot
be evaluated) and counted in the log; it never fails the call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from rules.facts import Fact
from rules.normalize import NormalizeOptions, normalize_resources

log = logging.getLogger("ehr_alerts.cds")


def facts_from(resources: Iterable[dict[str, Any]], patient: str, include_preliminary: bool) -> list[Fact]:
    """Facts of the patient's resources; resources of other patients and invalid ones are left out."""
    options = NormalizeOptions(include_preliminary=include_preliminary, default_patient=patient)
    results = normalize_resources(list(resources), options)
    rejected = sum(1 for r in results if r.outcome == "rejected")
    if rejected:
        log.info("resources left out of a CDS call", extra={"rejected": rejected})
    return [f for r in results if r.outcome == "accepted" for f in r.facts if f.patient == patient]


def draft_order_facts(draft_orders: dict[str, Any] | None, patient: str) -> list[Fact]:
    """Facts of the draft orders of an order-select / order-sign call."""
    if not draft_orders:
        return []
    return facts_from([draft_orders], patient, include_preliminary=False)
