"""``POST /cds-services/{id}/feedback``: accepted / overridden outcomes per card uuid, in batches.

A card uuid is either a stored alert id, or a request-only card (``CardIndex``: the card came from a call's
data alone). Either way the outcome moves an alert of the store through ``Store.transition``, so the
pharmacist sees it in the worklist, the audit export and the analytics, with history (who in the EHR did
what and why, source ``cds-hooks``): for a request-only card, the stream's alert that continues its episode
when there is one, else the card itself recorded as an alert of that rule and patient under the card's uuid
(``Store.open_external``: opened by ``system:cds-hooks`` with the hook and user that saw the card, then
accepted / overridden by the EHR). The same transition rules apply to both (an override after an accept is
409). Repeating an item is a no-op (idempotency key over card, outcome, timestamp and details). The whole
batch is validated first: one malformed item answers 400 and nothing is applied.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rules.catalog import Catalog
from service.cds import handover
from service.cds.cardindex import CardIndex
from service.cds.cards import suggestion_uuid
from service.cds.errors import CdsError
from workers.state.alerts import ALERT_SCHEMA_VERSION
from workers.state.store import Store, TransitionError

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")  # RFC 3339 §5.6


@dataclass
class FeedbackItem:
    """One validated feedback entry."""

    index: int
    card: str
    outcome: str  # accepted | overridden
    at: datetime
    accepted: list[str] = field(default_factory=list)  # suggestion uuids
    reason: dict[str, str] | None = None  # Coding
    comment: str | None = None

    def idempotency_key(self) -> str:
        """Same item twice -> same key."""
        text = json.dumps(
            [self.card, self.outcome, self.at.isoformat(), sorted(self.accepted), self.reason, self.comment],
            sort_keys=True,
        )
        return "cds-feedback:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _bad(index: int, member: str, message: str) -> CdsError:
    where = f"feedback[{index}].{member}"
    return CdsError(400, f"{where} {message}", where)


def parse_feedback(data: Any) -> list[FeedbackItem]:
    """Validate a feedback body; CdsError(400) naming the first problem."""
    if not isinstance(data, Mapping) or not isinstance(data.get("feedback"), list) or not data["feedback"]:
        raise CdsError(400, 'the body must be {"feedback": [...]} with at least one item', "feedback")
    items = []
    for i, raw in enumerate(data["feedback"]):
        if not isinstance(raw, Mapping):
            raise CdsError(400, f"feedback[{i}] must be a JSON object", f"feedback[{i}]")
        card = raw.get("card")
        if not isinstance(card, str) or not card:
            raise _bad(i, "card", "is required (the card's uuid)")
        outcome = raw.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise _bad(i, "outcome", "must be accepted or overridden")
        stamp = raw.get("outcomeTimestamp")
        if not isinstance(stamp, str) or not RFC3339.match(stamp):
            raise _bad(i, "outcomeTimestamp", "is required as an RFC 3339 date-time with a zone")
        try:
            at = datetime.fromisoformat(stamp.upper().replace("Z", "+00:00"))
        except ValueError:
            raise _bad(i, "outcomeTimestamp", "is not a valid date-time") from None
        item = FeedbackItem(i, card, outcome, at)
        accepted = raw.get("acceptedSuggestions")
        if outcome == "accepted":
            if not isinstance(accepted, list) or not accepted:
                raise _bad(i, "acceptedSuggestions", "is required when the outcome is accepted")
            for j, suggestion in enumerate(accepted):
                if not isinstance(suggestion, Mapping) or not isinstance(suggestion.get("id"), str):
                    raise _bad(i, f"acceptedSuggestions[{j}].id", "is required (the suggestion's uuid)")
                item.accepted.append(suggestion["id"])
        elif accepted is not None:
            raise _bad(i, "acceptedSuggestions", "is only allowed when the outcome is accepted")
        override = raw.get("overrideReason")
        if override is not None:
            if outcome != "overridden" or not isinstance(override, Mapping):
                raise _bad(i, "overrideReason", "must be an object, and only when the outcome is overridden")
            reason = override.get("reason")
            if reason is not None:
                if not isinstance(reason, Mapping) or not all(
                    isinstance(reason.get(k), str) and reason.get(k) for k in ("system", "code")
                ):
                    raise _bad(i, "overrideReason.reason", "must be a Coding with system and code")
                item.reason = {k: str(reason[k]) for k in ("system", "code", "display") if reason.get(k)}
            comment = override.get("userComment")
            if comment is not None:
                if not isinstance(comment, str):
                    raise _bad(i, "overrideReason.userComment", "must be a string")
                item.comment = comment[:2000] or None
        items.append(item)
    return items


@dataclass
class ItemResult:
    """What happened to one feedback item."""

    index: int
    card: str
    status: int
    message: str = ""
    alert_status: str | None = None


def _reason_with_display(catalog: Catalog, rule_id: str | None, reason: dict[str, str] | None) -> dict[str, str] | None:
    if reason is None or "display" in reason:
        return reason
    rule = catalog.get(rule_id) if rule_id else None
    for known in rule.card.override_reasons if rule else []:
        if known.system == reason["system"] and known.code == reason["code"]:
            return {**reason, "display": known.display}
    return reason


def _suggestion_ids(catalog: Catalog, rule_id: str | None, card_uuid: str) -> dict[str, str]:
    rule = catalog.get(rule_id) if rule_id else None
    return {suggestion_uuid(card_uuid, s.id): s.id for s in (rule.card.suggestions if rule else [])}


def _continued_by(record: dict[str, Any], store: Store, index: CardIndex) -> dict[str, Any] | None:
    """The stream's alert that continues a request-only card's episode (adopting it now if the stream opened
    it since the last call), with the card's earlier feedback replayed onto it; None when there is none."""
    if record.get("alert_id"):
        return store.find_alert(record["alert_id"])
    patient, rule = record.get("patient"), record.get("rule_id")
    if not patient or not rule:
        return None
    alert = next((a for a in store.alerts_for_patient(patient, open_only=True) if a["rule_id"] == rule), None)
    linked = index.adopt(patient, {rule: alert["id"]}).get(alert["id"]) if alert is not None else None
    if alert is None or linked is None:
        return None
    card_uuid, adopted = linked
    if adopted is not None:  # the rule's open episode, now continued by the alert: carry its outcome over
        alert = handover.replay(store, alert["id"], adopted)
    return alert if card_uuid == record["id"] else None  # else the card's episode had ended before the alert


def _recorded(record: dict[str, Any], store: Store, index: CardIndex, at: datetime) -> dict[str, Any]:
    """A request-only card an EHR user acted on, recorded in the alert store (see the module docstring);
    the rule's open alert instead when one appeared meanwhile (it is the episode)."""
    rests_on = record.get("alert") or {}
    card = record.get("card") or {}
    shown = [f"{name} {rests_on[f'shown_{name}']}" for name in ("hook", "user") if rests_on.get(f"shown_{name}")]
    why = (
        "card shown by a CDS Hooks call"
        + (f" ({' by '.join(shown)})" if shown else "")
        + " before the stream had this alert"
    )
    alert = {
        "schema_version": ALERT_SCHEMA_VERSION,
        "severity": card.get("indicator"),
        "evidence": [],
        **{k: v for k, v in rests_on.items() if not k.startswith("shown_")},
        "id": record["id"],
        "rule_id": record["rule_id"],
        "patient": record["patient"],
        "card": card or None,
    }
    opened = datetime.fromisoformat(record["opened_at"]) if record.get("opened_at") else at
    stored, _ = store.open_external(
        alert, min(opened, at), source="cds-hooks", why=why, as_open=bool(record.get("open"))
    )
    if stored["id"] == record["id"]:
        index.adopt(record["patient"], {record["rule_id"]: record["id"]})  # the episode is the stored alert now
    return stored


def apply_item(item: FeedbackItem, store: Store, index: CardIndex, catalog: Catalog, actor: str) -> ItemResult:
    """Apply one item to the stored alert the card names (recording a request-only card as one first)."""
    alert = store.find_alert(item.card)
    record = None if alert is not None else index.get(item.card)
    if alert is None and record is None:
        return ItemResult(item.index, item.card, 404, "no card with this uuid (unknown or expired)")
    if record is not None:  # a request-only card: the stream may have opened the alert of this episode since
        alert = _continued_by(record, store, index)
    rule_id = (alert or record or {}).get("rule_id")
    known = _suggestion_ids(catalog, rule_id, item.card)
    unknown = [s for s in item.accepted if s not in known]
    if unknown:
        return ItemResult(item.index, item.card, 404, "acceptedSuggestions names a suggestion this card does not have")
    if alert is None and record is not None:
        alert = _recorded(record, store, index, item.at)
    assert alert is not None
    try:
        updated = store.transition(
            alert["id"],
            "accept" if item.outcome == "accepted" else "override",
            actor,
            item.at,
            reason=_reason_with_display(catalog, rule_id, item.reason),
            comment=item.comment,
            accepted_suggestions=[known[s] for s in item.accepted] or None,
            idempotency_key=item.idempotency_key(),
            source="cds-hooks",
        )
    except TransitionError as exc:
        return ItemResult(item.index, item.card, 404 if exc.code == "not-found" else 409, str(exc))
    return ItemResult(item.index, item.card, 200, alert_status=updated.get("status"))
