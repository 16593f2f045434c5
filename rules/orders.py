"""Order concepts (valuesets/orders.yaml): which ServiceRequests and draft MedicationRequests the rules read."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from rules.datafiles import load_valueset


@dataclass(frozen=True)
class OrderIndex:
    """Look-ups from a lab concept or a medication class to the order concepts they make."""

    by_lab: dict[str, tuple[str, ...]] = field(default_factory=dict)
    by_class: dict[str, tuple[str, ...]] = field(default_factory=dict)
    display: dict[str, str] = field(default_factory=dict)
    counting_statuses: frozenset[str] = frozenset()


@cache
def order_index() -> OrderIndex:
    """The order value set, indexed (loaded once)."""
    data = load_valueset("orders")
    by_lab: dict[str, list[str]] = {}
    by_class: dict[str, list[str]] = {}
    display: dict[str, str] = {}
    for concept, entry in data["concepts"].items():
        display[concept] = entry["display"]
        for lab in entry.get("lab_concepts") or []:
            by_lab.setdefault(lab, []).append(concept)
        for class_id in entry.get("medication_classes") or []:
            by_class.setdefault(class_id, []).append(concept)
    return OrderIndex(
        by_lab={k: tuple(v) for k, v in by_lab.items()},
        by_class={k: tuple(v) for k, v in by_class.items()},
        display=display,
        counting_statuses=frozenset(data["counting_statuses"]),
    )


def order_concepts_for_lab(lab_concept: str) -> tuple[str, ...]:
    """Order concepts made by a ServiceRequest for this lab concept (``magnesium`` -> ``magnesium-order``)."""
    return order_index().by_lab.get(lab_concept, ())


def order_concepts_for_class(class_id: str) -> tuple[str, ...]:
    """Order concepts made by a draft MedicationRequest of this medication class."""
    return order_index().by_class.get(class_id, ())


def order_display(concept: str) -> str:
    """Human name of an order concept."""
    return order_index().display.get(concept, concept)


def order_counts(status: str | None) -> bool:
    """Whether an order in this status counts (draft, active, on-hold)."""
    return status in order_index().counting_statuses
