"""The data-problems queue as the API and the page use it: list with display fields, resolve and reopen."""

from __future__ import annotations

from typing import Any

from config.localtime import format_instant
from service.review import patients as directory
from service.review.core import ReviewError
from service.review.labels import short_concept
from workers.pipeline import get_store
from workers.state import review_index as rq
from workers.state.data_problems import REASONS, DataProblemError, DataProblems, ProblemQuery
from workers.state.review_index import CursorError


def queue() -> DataProblems:
    """The queue on this process's Redis."""
    return DataProblems(get_store().client)


def list_problems(query: ProblemQuery, cursor: str | None) -> dict[str, Any]:
    """A page of items (last seen first) with reason names, local times and who the patient is."""
    problems = queue()
    try:
        page = problems.list(query, cursor)
    except CursorError as exc:
        raise ReviewError(400, str(exc), "cursor") from exc
    known = directory.patient_contexts(item["patient"] for item in page.items)
    items = [decorate(item, known.get(item["patient"])) for item in page.items]
    return {"items": items, "next_cursor": page.next_cursor, "counts": problems.counts()}


def decorate(item: dict[str, Any], patient_context: dict[str, Any] | None) -> dict[str, Any]:
    """An item with its reason's name and advice, its patient and its times in the display zone."""
    name, advice = REASONS.get(item.get("reason") or "", REASONS["other"])
    return {
        **item,
        "reason_display": name,
        "concept_display": short_concept(item.get("concept")) or None,
        "advice": advice,
        "patient_context": patient_context,
        "display": {
            "as_of": format_instant(item.get("as_of")),
            "first_seen": format_instant(item.get("first_seen")),
            "last_seen": format_instant(item.get("last_seen")),
            "resolved_at": format_instant(item.get("resolved_at")) if item.get("resolved_at") else "",
        },
    }


def act(item_id: str, action: str, actor: str, *, revision: int | None, comment: str | None) -> dict[str, Any]:
    """Resolve (a note of what was done is required: it is the audit record) or reopen an item."""
    if revision is None:
        raise ReviewError(428, "send the revision you saw (If-Match or 'revision')", "revision", code="required")
    note = (comment or "").strip() or None
    if action == "resolve" and not note:
        raise ReviewError(400, "say what was done (e.g. 'unit mapped in the interface engine')", "comment", "required")
    try:
        item = queue().transition(item_id, action, actor, revision=revision, comment=note, at=rq.utcnow())
    except DataProblemError as exc:
        status = {"not-found": 404, "illegal": 409, "conflict": 409, "invalid": 400}.get(exc.code, 409)
        code = {"not-found": "not-found", "conflict": "conflict"}.get(exc.code, "business-rule")
        raise ReviewError(status, exc.message, "action" if exc.code != "conflict" else "revision", code) from exc
    return decorate(item, directory.patient_contexts([item["patient"]]).get(item["patient"]))
