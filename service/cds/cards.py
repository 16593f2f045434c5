"""From decisions and stored alerts to the CDS Hooks ``cards`` array.

One card per rule episode: a rule that fires on the call's data gives its fresh card, under the stored
alert's id when the stream already has an open alert for that rule (or under the uuid of the request-only
episode that alert continues, :mod:`service.cds.handover`), else under a request-only episode uuid
(:mod:`service.cds.cardindex`). A rule that is indeterminate on the call's data, or that the call could not
check for lack of data (:mod:`service.cds.coverage`), falls back to the stored alert's card. A determinate
"does not fire" shows nothing (the call's data is newer than the stream's last evaluation; a draft Mg order
only exists in the call). Episodes the clinician or pharmacist already overrode, accepted or snoozed are not
shown again. Cards are sorted critical, warning, info.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from rules.engine import Decision
from service.cds import handover
from service.cds.cardindex import CardIndex
from workers.state.alerts import decision_body
from workers.state.store import Store, effective_status

log = logging.getLogger("ehr_alerts.cds")
ORDER = {"critical": 0, "warning": 1, "info": 2}
HIDDEN = frozenset({"overridden", "accepted", "snoozed", "resolved", "retracted"})
SUGGESTION_NAMESPACE = uuid.UUID("6f1c7a52-3f3e-4c55-9a57-7e2b2f9a0c11")


def suggestion_uuid(card_uuid: str, suggestion_id: str) -> str:
    """Stable uuid of a card's suggestion (so acceptedSuggestions maps back to the rule's suggestion id)."""
    return str(uuid.uuid5(SUGGESTION_NAMESPACE, f"{card_uuid}/{suggestion_id}"))


def strip_empty(value: Any) -> Any:
    """Drop ``None``, ``""``, ``[]`` and ``{}`` members recursively (CDS Hooks: no null or empty elements)."""
    if isinstance(value, dict):
        out = {k: strip_empty(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        out_list = [strip_empty(v) for v in value]
        return [v for v in out_list if v not in (None, "", [], {})]
    return value


@lru_cache(maxsize=4096)
def _valid_resource(text: bytes) -> bool:
    resource = orjson.loads(text)
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except (ValidationError, KeyError, TypeError, ValueError):
        return False
    return True


def valid_fhir(resource: Any) -> bool:
    """True when ``resource`` is a valid FHIR R4 (R4B model) resource; results cached by content."""
    if not isinstance(resource, dict):
        return False
    try:
        return _valid_resource(orjson.dumps(resource, option=orjson.OPT_SORT_KEYS))
    except TypeError:
        return False


def finish_card(body: dict[str, Any], card_uuid: str, rule_id: str) -> dict[str, Any] | None:
    """A rendered card body (from the engine or a stored alert) as a CDS Hooks card with its uuid."""
    card = strip_empty(body)  # a new structure: the stored or rendered body is never changed
    card["uuid"] = card_uuid
    suggestions = []
    for suggestion in card.get("suggestions") or []:
        sid = suggestion.pop("id", None) or suggestion.get("label", "")
        actions = suggestion.get("actions") or []
        if any("resource" in a and not valid_fhir(a["resource"]) for a in actions):
            log.warning("suggestion dropped: resource is not valid FHIR", extra={"rule": rule_id, "suggestion": sid})
            continue
        suggestion["uuid"] = suggestion_uuid(card_uuid, sid)
        suggestions.append(suggestion)
    if suggestions:
        card["suggestions"] = suggestions
        card.setdefault("selectionBehavior", "at-most-one")
    else:  # nothing left to select from: neither member may stay (no empty members, no dangling behaviour)
        card.pop("suggestions", None)
        card.pop("selectionBehavior", None)
    return card if card.get("summary") and card.get("indicator") in ORDER else None


def _rests_on(decision: Decision, origin: Mapping[str, str]) -> dict[str, Any]:
    """What a request-only card rests on (the stream's alert shape, ``decision_body``), kept with it so
    feedback can record it as an alert, plus the hook and user it was shown to."""
    alert = decision_body(decision)["alert"]
    return {
        **{k: v for k, v in alert.items() if k not in ("id", "card")},
        **{f"shown_{k}": v for k, v in origin.items()},
    }


def hidden(record: dict[str, Any], now: datetime) -> bool:
    """Whether an episode's card stays hidden: handled (overridden, accepted) or snoozed until later."""
    return effective_status(record, now) in HIDDEN


def build_cards(
    decisions: Iterable[Decision],
    stored: Iterable[dict[str, Any]],
    patient: str,
    index: CardIndex,
    now: datetime,
    store: Store | None = None,
    *,
    unchecked: Mapping[str, str] | None = None,
    origin: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The cards of one call (see the module docstring for the merge policy). With ``store``, stored alerts
    that continue a request-only episode keep its card uuid and its outcome (:mod:`service.cds.handover`).
    ``unchecked`` (rule id -> note): rules the call could not check for lack of data
    (:mod:`service.cds.coverage`); their decisions count as indeterminate and the note goes on their card.
    ``origin`` (hook, user) is kept with request-only cards: who saw the card, should feedback record it."""
    unchecked = unchecked or {}
    open_alerts: dict[str, dict[str, Any]] = {}
    for alert in stored:
        current = open_alerts.get(alert["rule_id"])
        if current is None or alert.get("opened_at", "") > current.get("opened_at", ""):
            open_alerts[alert["rule_id"]] = alert
    chosen: list[tuple[Decision, str | None, dict[str, Any]]] = []  # (decision, alert id, card body)
    new: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    ended: list[str] = []
    for decision in decisions:
        if decision.rule_status != "active":
            continue  # shadow rules are evaluated, never shown
        alert = open_alerts.get(decision.rule_id)
        outcome = "indeterminate" if decision.rule_id in unchecked else decision.outcome
        if outcome == "fires" and decision.card:
            chosen.append((decision, alert["id"] if alert else None, decision.card))
            if alert is None:
                new[decision.rule_id] = (decision.card, _rests_on(decision, origin or {}))
        elif outcome == "indeterminate" and alert is not None and alert.get("card"):
            chosen.append((decision, alert["id"], alert["card"]))
        elif outcome == "not-fires" and alert is None:
            ended.append(decision.rule_id)
    records = index.episodes(patient, new, ended, now)
    shown = {d.rule_id: open_alerts[d.rule_id] for d, alert_id, _ in chosen if alert_id}
    linked = handover.link(store, index, patient, shown) if store is not None and shown else {}
    cards: list[dict[str, Any]] = []
    for decision, alert_id, body in chosen:
        record = shown[decision.rule_id] if alert_id else records[decision.rule_id]
        if hidden(record, now):
            continue
        card = finish_card(body, linked.get(record["id"], record["id"]), decision.rule_id)
        if card is not None and decision.rule_id in unchecked:
            card["detail"] = f"{card.get('detail', '').rstrip()}\n\n{unchecked[decision.rule_id]}".lstrip()
        if card is not None:
            cards.append(card)
    cards.sort(key=lambda c: (ORDER[c["indicator"]], c.get("source", {}).get("topic", {}).get("code", "")))
    return cards
