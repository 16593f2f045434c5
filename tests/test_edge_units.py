"""Units of the edge: the JSON depth / number scan (a property against a reference), SMART scopes, the
subscription status reader on hostile shapes, the ingest lane's admission bound."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.limits import Limits, json_problem, line_problem
from service.offload import Busy, Lane
from service.security.scopes import parse_scopes
from service.subscriptions import MAX_EVENT_NUMBER, parse_status

LIMITS = Limits(body_bytes=10**7, json_depth=8, number_chars=40, bundle_entries=10, ndjson_line_bytes=200)
TEXT = st.text(alphabet=st.sampled_from(list('ab[]{}"\\\n ,:é')), max_size=8)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_depth_scan_agrees_with_the_parsed_depth_whatever_the_strings_hold(value):
    text = json.dumps(value, ensure_ascii=False).encode()
    refused = json_problem(text, LIMITS)
    assert (refused is not None) == (depth(value) > LIMITS.json_depth), (refused, depth(value))


def test_long_numbers_are_refused_but_long_digit_strings_are_not():
    assert "EHR_ALERTS_MAX_NUMBER_CHARS" in json_problem(b'{"v": ' + b"1" * 41 + b"}", LIMITS)
    assert json_problem(b'{"v": "' + b"1" * 500 + b'"}', LIMITS) is None
    assert json_problem(b'{"v": -1.5e-10}', LIMITS) is None
    assert "EHR_ALERTS_MAX_NDJSON_LINE_BYTES" in line_problem(b"{" + b" " * 300 + b"}", LIMITS)


@pytest.mark.parametrize(
    ("claims", "allowed", "refused"),
    [
        ({"scope": "system/Observation.cu"}, [("Observation", "c"), ("Observation", "u")], [("Observation", "d")]),
        ({"scope": "system/*.cud"}, [("Condition", "d"), ("Observation", "c")], [("Observation", "r")]),
        ({"scope": "system/Observation.write system/*.read"}, [("Observation", "d"), ("X", "s")], [("X", "c")]),
        ({"scp": ["system/DetectedIssue.rs", 5]}, [("DetectedIssue", "r")], [("DetectedIssue", "c")]),
        ({"scope": "system/Observation.rs?category=laboratory"}, [], [("Observation", "r")]),
        ({"scope": "patient/*.cruds user/Observation.c"}, [], [("Observation", "c")]),
        ({"scope": "system/Observation.dc"}, [], [("Observation", "c")]),  # permissions must be in order
        ({"scope": 42}, [], [("Observation", "c")]),
    ],
)
def test_smart_system_scopes(claims, allowed, refused):
    scopes = parse_scopes(claims)
    assert all(scopes.allows(t, a) for t, a in allowed)
    assert not any(scopes.allows(t, a) for t, a in refused)


@pytest.mark.parametrize(
    "status",
    [
        {"notificationEvent": [1]},
        {"notificationEvent": {"eventNumber": 1}},
        {"notificationEvent": [{"eventNumber": "²"}]},
        {"notificationEvent": [{"eventNumber": "9" * 5000}]},
        {"notificationEvent": [{"eventNumber": MAX_EVENT_NUMBER + 1}]},
        {"notificationEvent": [{"eventNumber": True}]},
        {"subscription": "Subscription/s1", "type": ["heartbeat"]},
        {"subscription": {"reference": {"a": 1}}, "type": 7},
        {"subscription": {"reference": "x" * 10_000}},
    ],
)
def test_subscription_status_of_any_shape_is_read_with_problems_reported(status):
    note = parse_status({"resourceType": "SubscriptionStatus", **status})
    assert note is not None
    assert all(0 <= n <= MAX_EVENT_NUMBER for n in note.event_numbers)
    assert note.problems or note.subscription == "Subscription/s1"
    assert note.subscription is None or len(note.subscription) <= 256


def test_parameters_status_with_event_numbers():
    note = parse_status(
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "subscription", "valueReference": {"reference": "Subscription/p"}},
                {"name": "type", "valueCode": "event-notification"},
                {"name": "notification-event", "part": [{"name": "event-number", "valueString": "12"}]},
                {"name": "notification-event", "part": "junk"},
            ],
        }
    )
    assert (note.subscription, note.type, note.event_numbers) == ("Subscription/p", "event-notification", [12])


def test_the_lane_admits_a_bounded_number_of_requests():
    lane = Lane("test", threads=1, admitted=2)

    async def main() -> list[str]:
        outcomes = []
        async with lane.admit(), lane.admit():
            with pytest.raises(Busy):
                async with lane.admit():
                    pass
            outcomes.append(await lane.run(lambda: "ran on a lane thread"))
        async with lane.admit():  # places are given back
            outcomes.append("admitted again")
        return outcomes

    assert anyio.run(main) == ["ran on a lane thread", "admitted again"]


ENTRIES = st.lists(st.dictionaries(TEXT, VALUES, max_size=3) | VALUES, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(TEXT, VALUES, max_size=3), ENTRIES, st.booleans())
def test_a_large_bundle_parsed_entry_by_entry_equals_the_whole_parse(extra, entries, indent):
    import service.limits as limits

    value = {**extra, "resourceType": "Bundle", "entry": entries}
    body = json.dumps(value, ensure_ascii=False, indent=2 if indent else None).encode()
    wide = Limits(10**7, 64, 40, 10, 10**6)
    saved, limits.PIECEWISE_BYTES = limits.PIECEWISE_BYTES, 0  # every body takes the piecewise path
    try:
        assert limits.parse_bundle(body, wide) == json.loads(body)
    finally:
        limits.PIECEWISE_BYTES = saved
