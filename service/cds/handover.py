"""Handing a request-only card episode over to the stream's alert when the stream catches up.

The EHR may see a card before the stream has the data (a request-only episode, :mod:`service.cds.cardindex`).
When the stream then opens its alert for the same rule while that episode is still open, the two are one
episode: the card keeps the uuid the EHR holds (CDS Hooks feedback names it). Feedback on a request-only card
is recorded in the alert store at once (:mod:`service.cds.feedback`), so the stream finds that alert open and
continues it; a card record that still carries feedback history (written by a release that kept feedback in
the card index) has it replayed onto the alert once, reusing the feedback's idempotency keys.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from service.cds.cardindex import CardIndex
from workers.state.store import Store, TransitionError

log = logging.getLogger("ehr_alerts.cds")


def replay(store: Store, alert_id: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """Apply the feedback history of a request-only card record to the alert; the alert afterwards."""
    alert = None
    for entry in record.get("history") or []:
        try:
            alert = store.transition(
                alert_id,
                entry["action"],
                entry["by"],
                datetime.fromisoformat(entry["at"]),
                reason=entry.get("reason") or None,
                comment=entry.get("comment") or None,
                accepted_suggestions=entry.get("accepted_suggestions") or None,
                idempotency_key=entry.get("key"),
                source="cds-hooks",
            )
        except (TransitionError, KeyError, ValueError) as exc:
            log.warning("card feedback not replayed onto the alert", extra={"error": type(exc).__name__})
    return alert or store.find_alert(alert_id)


def link(store: Store, index: CardIndex, patient: str, alerts: dict[str, dict[str, Any]]) -> dict[str, str]:
    """For the open alerts about to be shown (rule id -> alert, updated in place after a replay): alert id ->
    the card uuid of the request-only episode each one continues."""
    linked = index.adopt(patient, {rule: alert["id"] for rule, alert in alerts.items()})
    for rule, alert in alerts.items():
        _, record = linked.get(alert["id"], (None, None))
        if record is not None:
            alerts[rule] = replay(store, alert["id"], record) or alert
    return {alert_id: card_uuid for alert_id, (card_uuid, _) in linked.items()}
