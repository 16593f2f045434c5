"""FHIR R4 Subscriptions backport notification bundles: status entry, handshake / heartbeat, event numbers.

The status arrives as a ``Parameters`` resource (R4 backport IG) or a ``SubscriptionStatus`` (R4B/R5).
Event numbers are tracked per subscription in Redis; a jump is a gap (lost notifications), counted and
reported so the operator can re-query the source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from config.settings import get_settings


@dataclass
class Notification:
    """What the status entry of a notification bundle says."""

    subscription: str | None
    type: str | None  # handshake | heartbeat | event-notification | query-status | query-event
    event_numbers: list[int] = field(default_factory=list)


def _param(parameters: list[Any], name: str) -> Mapping[str, Any] | None:
    return next((p for p in parameters if isinstance(p, Mapping) and p.get("name") == name), None)


def _value(param: Mapping[str, Any] | None) -> Any:
    if param is None:
        return None
    for key, value in param.items():
        if key.startswith("value"):
            return value.get("reference") if isinstance(value, Mapping) else value
    return None


def parse_status(resource: Mapping[str, Any]) -> Notification | None:
    """Read a subscription status resource; None if the entry is not one."""
    if resource.get("resourceType") == "SubscriptionStatus":
        numbers = [
            int(e["eventNumber"])
            for e in resource.get("notificationEvent") or []
            if str(e.get("eventNumber", "")).isdigit()
        ]
        subscription = (resource.get("subscription") or {}).get("reference")
        return Notification(subscription, resource.get("type"), numbers)
    if resource.get("resourceType") == "Parameters":
        parameters = resource.get("parameter") or []
        numbers = []
        for p in parameters:
            if isinstance(p, Mapping) and p.get("name") == "notification-event":
                number = _value(_param(p.get("part") or [], "event-number"))
                if str(number).isdigit():
                    numbers.append(int(number))
        return Notification(_value(_param(parameters, "subscription")), _value(_param(parameters, "type")), numbers)
    return None


def record_event_numbers(client: redis.Redis, note: Notification) -> list[str]:
    """Remember the highest event number per subscription; return a message per gap found."""
    if not note.subscription or not note.event_numbers:
        return []
    key = f"{get_settings().key_prefix}:subscriptions:last-event"
    gaps_key = f"{get_settings().key_prefix}:subscriptions:gaps"
    messages: list[str] = []
    last_raw = client.hget(key, note.subscription)
    last = int(last_raw) if last_raw else None
    for number in sorted(note.event_numbers):
        if last is not None and number > last + 1:
            missing = number - last - 1
            client.hincrby(gaps_key, note.subscription, missing)
            messages.append(
                f"eventNumber gap on {note.subscription}: expected {last + 1}, got {number} "
                f"({missing} notification(s) missing; re-query the source)"
            )
        last = number if last is None else max(last, number)
    if last is not None:
        client.hset(key, note.subscription, last)
    return messages
