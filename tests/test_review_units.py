"""Pure parts of the review feature: cursors, filters, outcome classification, the trend SVG, CSV cells."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service.review.api import _cell
from service.review.core import ReviewError, parse_if_match
from service.review.trend import sparkline
from workers.analytics import first_action_seconds, outcome, rule_analytics
from workers.state.review_index import CursorError, Query, decode_cursor, effective_status, encode_cursor, sort_score

NOW = datetime(2024, 5, 2, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)


def test_cursor_round_trip_and_binding():
    query = Query(status="open", rule="r1")
    cursor = encode_cursor(query, 12.5, "abc")
    assert decode_cursor(query, cursor) == (12.5, "abc")
    with pytest.raises(CursorError, match="other filters"):
        decode_cursor(Query(status="open", rule="r2"), cursor)
    with pytest.raises(CursorError):
        decode_cursor(query, "%%%")
    with pytest.raises(CursorError):
        decode_cursor(query, "eyJ4IjoxfQ")  # valid base64 JSON, wrong shape


def test_severity_order_score_puts_critical_first_then_oldest():
    old_info = {"severity": "info", "opened_at": "2024-01-01T00:00:00Z"}
    new_critical = {"severity": "critical", "opened_at": "2024-06-01T00:00:00Z"}
    old_critical = {"severity": "critical", "opened_at": "2024-02-01T00:00:00Z"}
    ordered = sorted([old_info, new_critical, old_critical], key=lambda s: sort_score(s, "sev"))
    assert ordered == [old_critical, new_critical, old_info]


def test_query_matches():
    summary = {"status": "acknowledged", "rule_id": "r1", "severity": "info", "patient": "p1", "summary": "Low K 3.1"}
    summary["opened_at"] = "2024-05-01T00:00:00Z"
    assert Query().matches(summary)  # open bucket holds acknowledged
    assert not Query(status="active").matches(summary)
    assert Query(status="all", text="low k").matches(summary)
    assert not Query(text="magnesium").matches(summary)
    assert not Query(opened_from=NOW).matches(summary)


def test_effective_status_ends_a_passed_snooze():
    snoozed = {"status": "snoozed", "snoozed_until": "2024-05-02T11:59:59.000000Z"}
    assert effective_status(snoozed, NOW) == "active"
    assert effective_status({**snoozed, "snoozed_until": "2024-05-02T12:00:01.000000Z"}, NOW) == "snoozed"


def _alert(history, status="active", opened="2024-05-01T00:00:00Z", rule="r1", version="1.0.0"):
    return {
        "id": "a",
        "rule_id": rule,
        "rule_version": version,
        "status": status,
        "opened_at": opened,
        "history": history,
    }


def test_outcome_uses_the_first_user_action_and_skips_snoozes():
    system = {"action": "opened", "by": "system", "at": "2024-05-01T00:00:00Z"}
    snooze = {"action": "snooze", "by": "user:a", "at": "2024-05-01T01:00:00Z"}
    override = {"action": "override", "by": "user:a", "at": "2024-05-01T02:00:00Z", "reason": {"code": "x"}}
    accept = {"action": "accept", "by": "ehr:e|u", "at": "2024-05-01T03:00:00Z"}
    assert outcome(_alert([system, snooze, override, accept]), NOW, DAY) == "overridden"
    assert outcome(_alert([system, accept, override]), NOW, DAY) == "accepted"
    assert outcome(_alert([system, snooze], opened="2024-05-02T00:00:00Z"), NOW, DAY) == "pending"
    assert outcome(_alert([system]), NOW, DAY) == "ignored"  # open 36 h
    assert outcome(_alert([system], status="resolved", opened="2024-05-02T11:00:00Z"), NOW, DAY) == "ignored"
    assert first_action_seconds(_alert([system, snooze, override])) == 3600


def test_rule_analytics_groups_by_version():
    opened = {"action": "opened", "by": "system", "at": "2024-05-01T00:00:00Z"}
    alerts = [_alert([opened], version="1.0.0"), _alert([opened], version="1.1.0"), _alert([opened], version="1.1.0")]
    rows = rule_analytics(alerts, 4, NOW, DAY)
    assert [(r["rule_version"], r["fired"], r["per_1000_patients"]) for r in rows] == [
        ("1.0.0", 1, 250.0),
        ("1.1.0", 2, 500.0),
    ]
    assert rule_analytics(alerts, 0, NOW, DAY)[0]["per_1000_patients"] is None


def test_if_match():
    assert parse_if_match('"3"') == 3
    assert parse_if_match('W/"12"') == 12
    assert parse_if_match("7") == 7
    assert parse_if_match(None) is None
    with pytest.raises(ReviewError):
        parse_if_match("*")


def test_sparkline_escapes_and_labels():
    points = [
        {"time": "2024-05-01T00:00:00Z", "value": 3.1, "unit": "mmol/L", "reported": "<b>3.1</b>", "reference": "x"},
        {"time": "2024-05-02T00:00:00Z", "value": 2.8, "unit": "mmol/L", "reported": "2.8 mmol/L", "reference": "y"},
    ]
    svg = sparkline(points, "2024-04-26T00:00:00Z", "2024-05-03T00:00:00Z", "Potassium")
    assert svg.startswith("<svg") and 'role="img"' in svg
    assert "<b>" not in svg and "&lt;b&gt;" in svg
    assert svg.count("<circle") == 2 and "mmol/L" in svg
    empty = sparkline([], "2024-04-26T00:00:00Z", "2024-05-03T00:00:00Z", "Magnesium")
    assert "no Magnesium results" in empty


def test_csv_cells_never_start_a_formula():
    assert _cell("=1+1") == "'=1+1"
    assert _cell("@SUM(A1)") == "'@SUM(A1)"
    assert _cell("plain") == "plain"
    assert _cell({"code": "x"}) == '{"code": "x"}'
