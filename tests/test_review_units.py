"""Pure parts of the review feature: cursors, filters, order, escalation, outcome classification, the trend
charts, local time, card text, the readable detail, patient context, data-problem records, CSV cells."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import pytest

from config.localtime import format_instant, to_local
from config.settings import SettingsError, load_settings
from rules.catalog import load_catalog
from rules.facts import Fact
from service.review.api import _cell
from service.review.cardtext import render_card_markdown
from service.review.core import ReviewError, changes_since, parse_if_match
from service.review.patients import PatientDisplay
from service.review.readable import duration, evidence_rows, why_lines
from service.review.trend import chart_spec, render_chart
from workers.analytics import first_action_seconds, outcome, rule_analytics
from workers.state.data_problems import DataProblem, classify
from workers.state.review_index import (
    CursorError,
    Query,
    decode_cursor,
    effective_status,
    encode_cursor,
    escalation,
    sort_score,
    summarize,
)
from workers.state.statuses import CLOSED, OPEN, groups_of

NOW = datetime(2024, 5, 2, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_cursor_round_trip_and_binding():
    query = Query(status="open", rule="r1")
    cursor = encode_cursor(query, 12.5, "abc")
    assert decode_cursor(query, cursor) == (12.5, "abc")
    with pytest.raises(CursorError, match="other filters"):
        decode_cursor(Query(status="open", rule="r2"), cursor)
    with pytest.raises(CursorError, match="other filters"):
        decode_cursor(Query(status="open", rule="r1", group=True), cursor)  # a grouped page is another query
    with pytest.raises(CursorError):
        decode_cursor(query, "%%%")
    with pytest.raises(CursorError):
        decode_cursor(query, "eyJ4IjoxfQ")  # valid base64 JSON, wrong shape


def test_statuses_and_groups():
    assert set(OPEN) == {"active", "acknowledged", "accepted", "overridden", "snoozed"}
    assert set(CLOSED) == {"resolved", "retracted", "expired", "withdrawn"}
    assert groups_of("active") == ["todo", "open", "all"]
    assert groups_of("overridden") == ["open", "all"]
    assert groups_of("expired") == ["closed", "all"]
    assert groups_of("from-the-future") == ["all"]  # an unknown status still shows up somewhere


def test_severity_order_puts_unacted_escalations_first_then_critical_then_longest_waiting():
    old_info = {"severity": "info", "raised_at": "2024-01-01T00:00:00Z"}
    new_critical = {"severity": "critical", "raised_at": "2024-06-01T00:00:00Z"}
    old_critical = {"severity": "critical", "raised_at": "2024-02-01T00:00:00Z"}
    escalated_info = {"severity": "info", "raised_at": "2024-07-01T00:00:00Z", "escalated": {"why": "K < 3.0"}}
    ordered = sorted([old_info, new_critical, escalated_info, old_critical], key=lambda s: sort_score(s, "sev"))
    assert ordered == [escalated_info, old_critical, new_critical, old_info]


def _alert(history, status="active", opened="2024-05-01T00:00:00Z", rule="r1", version="1.0.0", created=None):
    return {
        "id": "a",
        "rule_id": rule,
        "rule_version": version,
        "status": status,
        "opened_at": opened,
        "created_at": created,
        "history": history,
        "card": {"summary": "Low K"},
        "revision": len(history),
    }


SYSTEM = {"action": "opened", "by": "system", "at": "2024-05-01T00:00:00Z"}
OVERRIDE = {"action": "override", "by": "user:a", "at": "2024-05-01T02:00:00Z", "reason": {"code": "x"}}
ESCALATE = {"action": "escalated", "by": "system", "at": "2024-05-01T05:00:00Z", "why": "torsades on ECG"}
ESCALATE |= {"from": "overridden", "to": "active"}


def test_escalation_lasts_until_someone_acts():
    assert escalation(_alert([SYSTEM, OVERRIDE, ESCALATE]), "active") == {
        "at": "2024-05-01T05:00:00Z",
        "why": "torsades on ECG",
        "from": "overridden",
    }
    updated = {"action": "updated", "by": "system", "at": "2024-05-01T06:00:00Z"}
    assert escalation(_alert([SYSTEM, OVERRIDE, ESCALATE, updated]), "active") is not None
    acknowledged = {"action": "acknowledge", "by": "user:b", "at": "2024-05-01T07:00:00Z"}
    assert escalation(_alert([SYSTEM, OVERRIDE, ESCALATE, acknowledged]), "acknowledged") is None
    assert escalation(_alert([SYSTEM, OVERRIDE]), "overridden") is None
    summary = summarize("p1", {**_alert([SYSTEM, OVERRIDE, ESCALATE]), "status": "active"}, NOW)
    assert summary["escalated"]["why"] == "torsades on ECG"
    assert summary["buckets"] == ["active", "todo", "open", "all"]


def test_summary_raised_time_is_the_wall_clock_and_falls_back_to_the_clinical_time():
    assert summarize("p", _alert([SYSTEM], created="2026-01-01T10:00:00Z"), NOW)["raised_at"] == "2026-01-01T10:00:00Z"
    assert summarize("p", _alert([SYSTEM]), NOW)["raised_at"] == "2024-05-01T00:00:00Z"
    assert summarize("p", {**_alert([SYSTEM]), "source": "cds-hooks"}, NOW)["source"] == "cds-hooks"
    assert summarize("p", _alert([SYSTEM]), NOW)["source"] == "stream"


def test_query_matches_status_groups():
    summary = {"status": "acknowledged", "rule_id": "r1", "severity": "info", "patient": "p1", "summary": "Low K 3.1"}
    summary["raised_at"] = "2024-05-01T00:00:00Z"
    assert Query().matches(summary)  # the to-do list holds acknowledged
    assert Query(status="open").matches(summary)
    assert not Query(status="closed").matches(summary)
    assert not Query(status="active").matches(summary)
    assert Query(status="accepted").matches({**summary, "status": "accepted"})
    assert not Query().matches({**summary, "status": "accepted"})  # decided: not to do
    assert Query(status="closed").matches({**summary, "status": "withdrawn"})
    assert Query(status="all", text="low k").matches(summary)
    assert not Query(text="magnesium").matches(summary)
    assert not Query(opened_from=NOW).matches(summary)
    assert Query(patients=frozenset({"p1", "p2"})).matches(summary)
    assert not Query(patients=frozenset()).matches(summary)


def test_effective_status_ends_a_passed_snooze():
    snoozed = {"status": "snoozed", "snoozed_until": "2024-05-02T11:59:59.000000Z"}
    assert effective_status(snoozed, NOW) == "active"
    assert effective_status({**snoozed, "snoozed_until": "2024-05-02T12:00:01.000000Z"}, NOW) == "snoozed"


def test_outcome_acknowledging_is_not_accepting():
    snooze = {"action": "snooze", "by": "user:a", "at": "2024-05-01T01:00:00Z"}
    ack = {"action": "acknowledge", "by": "user:a", "at": "2024-05-01T01:00:00Z"}
    accept = {"action": "accept", "by": "ehr:e|u", "at": "2024-05-01T03:00:00Z", "source": "cds-hooks"}
    resolve = {"action": "resolve", "by": "user:b", "at": "2024-05-01T04:00:00Z"}
    assert outcome(_alert([SYSTEM, snooze, OVERRIDE, accept]), NOW, DAY) == "overridden"
    assert outcome(_alert([SYSTEM, accept, OVERRIDE]), NOW, DAY) == "accepted"
    assert outcome(_alert([SYSTEM, ack]), NOW, DAY) == "acknowledged"
    assert outcome(_alert([SYSTEM, ack, resolve], status="resolved"), NOW, DAY) == "resolved_by_hand"
    assert outcome(_alert([SYSTEM, snooze], opened="2024-05-02T00:00:00Z"), NOW, DAY) == "pending"
    assert outcome(_alert([SYSTEM]), NOW, DAY) == "ignored"  # raised 36 h ago
    assert outcome(_alert([SYSTEM], status="expired", opened="2024-05-02T11:00:00Z"), NOW, DAY) == "ignored"
    # the wait counts from when the alert was raised (wall clock), not from the clinical time
    replayed = _alert([SYSTEM, OVERRIDE | {"at": "2026-01-01T00:30:00Z"}], created="2026-01-01T00:00:00Z")
    assert first_action_seconds(replayed) == 1800
    assert outcome(_alert([SYSTEM], created="2024-05-02T11:00:00Z"), NOW, DAY) == "pending"


def test_rule_analytics_groups_by_version_and_counts_closings_and_the_ehr():
    alerts = [
        _alert([SYSTEM], version="1.0.0", status="expired"),
        _alert([SYSTEM, ESCALATE], version="1.1.0"),
        {
            **_alert(
                [SYSTEM, {"action": "accept", "by": "ehr:x", "source": "cds-hooks", "at": "2024-05-01T01:00:00Z"}],
                version="1.1.0",
                status="accepted",
            ),
            "source": "cds-hooks",
        },
    ]
    rows = rule_analytics(alerts, 4, NOW, DAY)
    assert [(r["rule_version"], r["fired"], r["per_1000_patients"]) for r in rows] == [
        ("1.0.0", 1, 250.0),
        ("1.1.0", 2, 500.0),
    ]
    assert rows[0]["closed"] == {"resolved": 0, "retracted": 0, "expired": 1, "withdrawn": 0}
    assert (rows[1]["escalated"], rows[1]["raised_by_cds_hooks"], rows[1]["acted_on_in_ehr"]) == (1, 1, 1)
    assert (rows[1]["accepted"], rows[1]["accepted_rate"]) == (1, 0.5)
    assert rule_analytics(alerts, 0, NOW, DAY)[0]["per_1000_patients"] is None


def test_if_match():
    assert parse_if_match('"3"') == 3
    assert parse_if_match('W/"12"') == 12
    assert parse_if_match("7") == 7
    assert parse_if_match(None) is None
    with pytest.raises(ReviewError):
        parse_if_match("*")


def test_changes_since_names_what_happened_after_the_seen_revision():
    history = [SYSTEM, OVERRIDE, ESCALATE]
    alert = {"history": history, "revision": 3}
    assert changes_since(alert, 1) == [OVERRIDE, ESCALATE]
    assert changes_since(alert, 3) == []


# --- local time --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instant", "zone", "shown"),
    [
        # Europe/Berlin springs forward at 01:00 UTC on 31 March 2024 (02:00 CET -> 03:00 CEST)
        ("2024-03-31T00:30:00Z", "Europe/Berlin", "31 Mar 2024 01:30 CET"),
        ("2024-03-31T01:30:00Z", "Europe/Berlin", "31 Mar 2024 03:30 CEST"),
        # America/New_York falls back at 06:00 UTC on 3 November 2024: 01:30 happens twice, EDT then EST
        ("2024-11-03T05:30:00Z", "America/New_York", "03 Nov 2024 01:30 EDT"),
        ("2024-11-03T06:30:00Z", "America/New_York", "03 Nov 2024 01:30 EST"),
        ("2024-11-03T06:30:00+00:00", "UTC", "03 Nov 2024 06:30 UTC"),
    ],
)
def test_a_fixed_instant_on_both_sides_of_a_dst_change(instant, zone, shown):
    assert format_instant(instant, zone) == shown


def test_local_time_helpers():
    assert format_instant(None) == "—" and format_instant("not a time") == "—"
    assert format_instant("2024-03-31T01:30:00Z", "Europe/Berlin", "short") == "31 Mar 03:30"
    assert to_local(datetime(2024, 7, 1, 12, tzinfo=UTC), "Asia/Kolkata").hour == 17
    assert format_instant("2024-07-01T12:00:00", "Europe/Berlin", "time") == "14:00 CEST"  # no zone: UTC


def test_display_settings_are_validated():
    assert load_settings(display_timezone="Europe/Berlin").display_timezone == "Europe/Berlin"
    with pytest.raises(SettingsError, match="EHR_ALERTS_DISPLAY_TIMEZONE"):
        load_settings(display_timezone="Mars/Olympus_Mons")
    with pytest.raises(SettingsError, match="EHR_ALERTS_DISPLAY_MG_UNIT"):
        load_settings(display_mg_unit="mg%")


# --- charts ------------------------------------------------------------------------------------------------

K_POINTS = [
    {"time": "2024-05-01T00:00:00Z", "value": 3.1, "unit": "mmol/L", "reported": "<b>3.1</b>", "reference": "x"},
    {"time": "2024-05-02T00:00:00Z", "value": 2.8, "unit": "mmol/L", "reported": "2.8 mmol/L", "reference": "y"},
]


def test_potassium_chart_has_fixed_axis_threshold_line_and_focusable_points(catalog):
    spec = chart_spec("potassium", "mmol/L", catalog)
    assert spec.threshold == (3.5, "low K")  # the hypokalemia rule's k_low, read from its file
    svg = render_chart(K_POINTS, "2024-04-26T00:00:00Z", "2024-05-03T00:00:00Z", spec, "UTC")
    assert svg.startswith("<svg") and 'role="group"' in svg and 'font-size="12"' in svg
    assert re.findall(r'class="tick"[^>]*>([0-9.]+)<', svg) == ["2", "3", "4", "5", "6"]  # fixed, round ticks
    assert 'class="threshold"' in svg and "low K &lt; 3.5 mmol/L" in svg
    assert svg.count('class="pt" tabindex="0"') == 2
    assert "2.8 mmol/L, 02 May 2024 00:00 UTC" in svg  # value and local time on hover / focus
    assert "<b>" not in svg and "&lt;b&gt;" in svg
    one = render_chart(K_POINTS[:1], "2024-04-26T00:00:00Z", "2024-05-03T00:00:00Z", spec, "UTC")
    assert re.findall(r'class="tick"[^>]*>([0-9.]+)<', one)[:5] == ["2", "3", "4", "5", "6"]  # no 3.51/4.29
    low = [{**K_POINTS[0], "value": 1.4, "reported": "1.4 mmol/L"}]
    widened = render_chart(low, "2024-04-26T00:00:00Z", "2024-05-03T00:00:00Z", spec, "UTC")
    assert re.findall(r'class="tick"[^>]*>([0-9.]+)<', widened)[:2] == ["1", "2"]  # widened, never clipped
    empty = render_chart([], "2024-04-26T00:00:00Z", "2024-05-03T00:00:00Z", spec, "UTC")
    assert "no potassium results in this window" in empty


def test_magnesium_chart_in_the_sites_unit_with_the_rules_own_equivalent(catalog):
    mg = [{"time": "2024-05-01T00:00:00Z", "value": 0.58, "unit": "mmol/L", "reported": "1.4 mg/dL", "reference": "m"}]
    spec = chart_spec("magnesium", "mg/dL", catalog)
    assert spec.threshold == (1.7, "low Mg")  # the parameter's declared equivalent, not 0.70 / 0.4114
    svg = render_chart(mg, "2024-04-26T00:00:00Z", "2024-05-03T00:00:00Z", spec, "UTC")
    assert "1.41 mg/dL (lab: 1.4 mg/dL), 01 May 2024 00:00 UTC" in svg  # charted from the canonical 0.58 mmol/L
    assert "low Mg &lt; 1.7 mg/dL" in svg
    molar = chart_spec("magnesium", "mmol/L", catalog)
    assert molar.threshold == (0.7, "low Mg")
    assert "0.58 mmol/L (lab: 1.4 mg/dL)" in render_chart(mg, "2024-04-26T00:00:00Z", "2024-05-03T00:00:00Z", molar)


# --- readable detail -------------------------------------------------------------------------------------------

EVIDENCE = [
    {"input": "low_potassium", "reference": "Observation/k1/_history/1", "concept": "potassium",
     "display": "Potassium [Moles/volume] in Serum or Plasma", "value": "3.1", "unit": "mmol/L",
     "reported": "3.1 mmol/L", "time": "2024-03-12T10:30:00Z", "notes": []},
    {"input": "latest_potassium", "reference": "Observation/k1/_history/1", "concept": "potassium",
     "display": "Potassium [Moles/volume] in Serum or Plasma", "value": "3.1", "unit": "mmol/L",
     "reported": "3.1 mmol/L", "time": "2024-03-12T10:30:00Z", "notes": []},
    {"input": "magnesium", "reference": "Observation/m1/_history/1", "concept": "magnesium",
     "display": "Magnesium [Mass/volume] in Serum or Plasma", "value": "0.58", "unit": "mmol/L",
     "reported": "1.4 mg/dL", "time": "2024-03-11T10:30:00Z", "notes": []},
    {"input": "diuretic", "reference": "MedicationRequest/f1", "concept": "loop-diuretic",
     "display": "Furosemide 40 mg tablet (loop diuretic)", "time": "2024-03-10T15:30:00Z", "notes": []},
]  # fmt: skip


def test_evidence_rows_have_no_internal_names_no_duplicates_and_both_units():
    rows = evidence_rows(EVIDENCE, "2024-03-12T12:30:00Z", "Europe/Berlin")
    assert len(rows) == 3
    tests = [r["test"] for r in rows]
    assert "low_potassium" not in str(rows) and "latest_potassium" not in str(rows)
    assert tests == ["Loop diuretic", "Magnesium", "Potassium"]
    mg = rows[1]
    assert (mg["reported"], mg["canonical"], mg["time"], mg["before"]) == (
        "1.4 mg/dL",
        "0.58 mmol/L",
        "11 Mar 2024 11:30 CET",
        "1 d 2 h",
    )
    assert rows[2]["canonical"] is None  # same unit: shown once
    assert rows[0]["what"] == "Furosemide 40 mg tablet (loop diuretic)"


def test_why_lines_speak_clinical_words_in_local_time():
    explanation = (
        "Fires: 2 low potassium at least 24 h apart between 2024-03-09T10:30:00Z and 2024-03-12T10:30:00Z; and "
        "Potassium [Moles/volume] in Serum or Plasma 3.1 mmol/L at 2024-03-12T10:30:00Z is below 3.5 mmol/L"
    )
    lines = why_lines(explanation, EVIDENCE, "Europe/Berlin")
    assert lines == [
        "2 low potassium at least 24 h apart between 09 Mar 2024 11:30 CET and 12 Mar 2024 11:30 CET",
        "Potassium 3.1 mmol/L at 12 Mar 2024 11:30 CET is below 3.5 mmol/L",
    ]
    assert duration(59) == "<1 min" and duration(3 * 3600 + 600) == "3 h 10 min" and duration(86400) == "1 d"


def test_card_text_renders_as_commonmark_and_nothing_active_gets_through():
    html = str(
        render_card_markdown(
            "**Potassium 3.1 mmol/L**\n\nSecond paragraph <script>alert(1)</script> <img src=x onerror=alert(1)>"
            "\n\n[ok](https://doi.org/10.1681/ASN.2007070792) [bad](javascript:alert(1)) ![t](https://e.vil/t.png)"
        )
    )
    assert html.count("<p>") == 3 and "<strong>Potassium 3.1 mmol/L</strong>" in html
    assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html
    assert 'href="https://doi.org/10.1681/ASN.2007070792" target="_blank" rel="noopener noreferrer"' in html
    assert "javascript:" not in html.split("[bad]")[0] and 'href="javascript' not in html
    assert render_card_markdown(None) == ""


def test_patient_age_in_years_months_or_days():
    patient = PatientDisplay("p1", birth_date=date(1957, 6, 15))
    assert patient.age(date(2024, 6, 14)) == "66 y" and patient.age(date(2024, 6, 15)) == "67 y"
    assert PatientDisplay("b", birth_date=date(2023, 1, 20)).age(date(2024, 6, 1)) == "16 mo"
    assert PatientDisplay("n", birth_date=date(2024, 5, 20)).age(date(2024, 6, 1)) == "12 d"
    assert PatientDisplay("x").age(date(2024, 6, 1)) is None
    assert PatientDisplay("p1", encounter_class="IMP").as_dict(date(2024, 6, 1))["encounter_class_display"] == (
        "Inpatient"
    )


# --- data problems -----------------------------------------------------------------------------------------------


def test_data_problem_reason_and_identity():
    assert classify("unknown unit 'mg%' for magnesium") == "unknown-unit"
    assert classify("missing unit for potassium") == "missing-unit"
    assert classify("implausible value 45 mmol/L (outside 0.5-15 mmol/L); treated as a data error") == (
        "implausible-value"
    )
    assert classify("unit mg/dL contradicts the molar LOINC code 2823-3") == "unit-contradicts-code"
    assert classify("effective time is in the future") == "future-date"
    assert classify("something new") == "other"
    fact = Fact(
        patient="p1", concept="magnesium", kind="lab", resource_type="Observation", resource_id="m1", version="2",
        reported_value="1.5", reported_unit="mg%", start=datetime(2024, 3, 13, 11, tzinfo=UTC),
        problem="unknown unit 'mg%' for magnesium",
    )  # fmt: skip
    problem = DataProblem.from_fact(fact, as_of="2024-03-13T12:00:00+01:00", rule_id="arrhythmia-with-low-magnesium")
    assert (problem.reason, problem.reported, problem.resources) == (
        "unknown-unit",
        "1.5 mg%",
        ("Observation/m1/_history/2",),
    )
    assert problem.as_of == "2024-03-13T11:00:00Z"
    other_rule = DataProblem.from_fact(fact, as_of="2024-03-13T12:00:00Z", rule_id="hypokalemia-without-magnesium")
    assert other_rule.id == problem.id  # one item per cause, whatever rule hit it
    corrected = Fact(**{**fact.model_dump(), "version": "3"})
    assert DataProblem.from_fact(corrected, as_of="2024-03-13T12:00:00Z").id != problem.id
    with pytest.raises(ValueError):
        DataProblem(patient="p", reason="bad-reason", detail="x", resources=("Observation/1",), as_of="2024-01-01")


def test_csv_cells_never_start_a_formula():
    assert _cell("=1+1") == "'=1+1"
    assert _cell("@SUM(A1)") == "'@SUM(A1)"
    assert _cell("plain") == "plain"
    assert _cell({"code": "x"}) == '{"code": "x"}'
