"""FHIR R4 Subscriptions backport notification bundles: status entry, handshake / heartbeat, event numbers.

The status arrives as a ``Parameters`` resource (R4 backport IG) or a ``SubscriptionStatus`` (R4B/R5).
Event numbers are tracked per subscription in Redis; a jump is a gap (lost notifications), counted and
reported so the operator can re-query the source.

Whatever shape the status has, reading it never fails: a member of the wrong type is reported as a problem
(a warning in the answer) and left out. An event number must be a plain decimal integer below 2^53; a jump
of more than :data:`MAX_GAP` is reported as implausible and not recorded, so one bogus number cannot disable
gap detection for the subscription.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from config.settings import get_settings

#: Largest event number accepted (JSON's safe integer range).
MAX_EVENT_NUMBER = 2**53 - 1
#: Largest jump recorded as a gap; a larger one is reported and ignored (a sender's bug or a reset).
MAX_GAP = 1_000_000
_NUMBER = re.compile(r"^[0-9]{1,16}$")
_REFERENCE = re.compile(r"^[A-Za-z0-9\-._:/]{1,256}$")
_TYPES = frozenset({"handshake", "heartbeat", "event-notification", "query-status", "query-event"})


@dataclass
class Notification:
    """What the status entry of a notification bundle says."""

    subscription: str | None
    type: str | None  # handshake | heartbeat | event-notification | query-status | query-event
    event_numbers: list[int] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (severity, message)


def _param(parameters: list[Any], name: str) -> Mapping[str, Any] | None:
    return next((p for p in parameters if isinstance(p, Mapping) and p.get("name") == name), None)


def _value(param: Mapping[str, Any] | None) -> Any:
    if param is None:
        return None
    for key, value in param.items():
        if isinstance(key, str) and key.startswith("value"):
            return value.get("reference") if isinstance(value, Mapping) else value
    return None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(raw: Any, note: Notification) -> None:
    text = str(raw) if isinstance(raw, int | str) and not isinstance(raw, bool) else None
    if text is None or not _NUMBER.match(text) or int(text) > MAX_EVENT_NUMBER:
        note.problems.append(("warning", f"eventNumber {str(raw)[:40]!r} is not an integer up to 2^53: ignored"))
        return
    note.event_numbers.append(int(text))


def _checked(subscription: Any, kind: Any, note: Notification) -> Notification:
    if isinstance(subscription, str) and _REFERENCE.match(subscription):
        note.subscription = subscription
    elif subscription is not None:
        note.problems.append(("warning", "subscription is not a reference (Subscription/<id>): event numbers ignored"))
    if isinstance(kind, str) and kind in _TYPES:
        note.type = kind
    elif kind is not None:
        note.problems.append(("warning", f"notification type {str(kind)[:40]!r} is not known: read as an event"))
    return note


def parse_status(resource: Mapping[str, Any]) -> Notification | None:
    """Read a subscription status resource; None if the entry is not one."""
    note = Notification(None, None)
    if resource.get("resourceType") == "SubscriptionStatus":
        events = resource.get("notificationEvent")
        if events is not None and not isinstance(events, list):
            note.problems.append(("warning", "notificationEvent is not an array: event numbers ignored"))
        for event in _list(events):
            if isinstance(event, Mapping) and "eventNumber" in event:
                _number(event["eventNumber"], note)
            else:
                note.problems.append(("warning", "a notificationEvent without eventNumber: ignored"))
        subscription = resource.get("subscription")
        reference = subscription.get("reference") if isinstance(subscription, Mapping) else subscription
        return _checked(reference, resource.get("type"), note)
    if resource.get("resourceType") == "Parameters":
        parameters = _list(resource.get("parameter"))
        for p in parameters:
            if isinstance(p, Mapping) and p.get("name") == "notification-event":
                number = _value(_param(_list(p.get("part")), "event-number"))
                if number is not None:
                    _number(number, note)
        return _checked(_value(_param(parameters, "subscription")), _value(_param(parameters, "type")), note)
    return None


def record_event_numbers(client: redis.Redis, note: Notification) -> list[str]:
    """Remember the highest event number per subscription; return a message per gap found."""
    if not note.subscription or not note.event_numbers:
        return []
    key = f"{get_settings().key_prefix}:subscriptions:last-event"
    gaps_key = f"{get_settings().key_prefix}:subscriptions:gaps"
    messages: list[str] = []
    last_raw = client.hget(key, note.subscription)
    last = int(last_raw) if last_raw and str(last_raw).isdigit() else None
    for number in sorted(note.event_numbers):
        if last is not None and number > last + MAX_GAP:
            messages.append(
                f"eventNumber {number} on {note.subscription} jumps more than {MAX_GAP} past {last}: implausible, "
                "not recorded (check the sender)"
            )
            continue
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
