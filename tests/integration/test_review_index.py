"""The worklist index on a real Redis: incremental sync, revision guard, rebuild, layout upgrade, and a property
of cursor pages (every match once, in order, for any states and queries)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from itest_builders import furosemide, potassium
from review_support import T0, close, escalate, seed, ward

from workers.state.review_index import (
    BUCKETS,
    INDEX_FORMAT,
    SEVERITIES,
    SORTS,
    Query,
    ReviewIndex,
    format_key,
    order_key,
    sort_score,
    summarize,
    summary_key,
)

pytestmark = pytest.mark.slow


def test_sync_is_incremental_and_an_older_revision_never_wins(store):
    seed(store, ward())
    index = ReviewIndex(store)
    assert index.sync() == 6
    assert index.sync() == 0  # nothing changed: the overlap re-reads nothing
    alert_id = index.list(Query(status="all", limit=1)).items[0]["id"]
    alert = store.find_alert(alert_id)
    newer = store.transition(alert_id, "acknowledge", "user:t", datetime.now(UTC))
    index.index_alert(newer["patient"], newer)
    index.index_alert(alert["patient"], alert)  # a slow reader with the old state arrives late
    summary = json.loads(store.client.get(summary_key(alert_id)))
    assert (summary["status"], summary["revision"]) == ("acknowledged", newer["revision"])
    assert index.counts()["acknowledged"] == 1 and index.counts()["active"] == 5


def test_rebuild_restores_a_lost_index(store):
    seed(store, ward())
    index = ReviewIndex(store)
    index.sync()
    before = [s["id"] for s in index.list(Query(status="all")).items]
    for key in store.client.scan_iter(match=f"{store.settings.key_prefix}:{{review}}:z:*"):
        store.client.delete(key)
    assert index.list(Query(status="all")).items == []
    assert index.rebuild() == 6
    assert [s["id"] for s in index.list(Query(status="all")).items] == before


def test_scan_budget_returns_short_pages_with_a_cursor_that_goes_on(store):
    seed(store, ward())
    index = ReviewIndex(store, scan_budget=2)
    index.sync()
    query = Query(status="all", text="3.4 mmol")  # only p5, the last in the default order
    found, cursor, pages = [], None, 0
    while True:
        page = index.list(query, cursor)
        assert page.scanned <= 2
        found += [s["patient"] for s in page.items]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert found == ["p5"] and pages == 4  # 2 + 2 + 2 walked, then an empty last page


def test_an_index_of_an_older_layout_is_rebuilt(store):
    seed(store, ward())
    index = ReviewIndex(store)
    index.sync()
    store.client.set(format_key(), "1")  # as left by the previous release (its "open" meant active + acknowledged)
    store.client.zadd(order_key("open", "time"), {"ghost": 1.0})
    assert index.sync() == 6  # everything re-read
    assert store.client.get(format_key()) == INDEX_FORMAT
    assert "ghost" not in store.client.zrange(order_key("open", "time"), 0, -1)
    assert index.counts()["todo"] == 6


def _reference(query: Query, summaries: list[dict]) -> list[dict]:
    """What a page walk must return: every match, in the query's order (ties by id, as Redis orders them)."""
    order = "sev" if query.sort == "severity" else "time"
    rows = sorted((s for s in summaries if query.matches(s)), key=lambda s: (sort_score(s, order), s["id"]))
    return rows[::-1] if query.sort == "newest" else rows


def test_pages_walk_every_match_once_in_order_whatever_the_states_property(store):
    """Property: for random alert states (people's actions, escalations, closings) and random queries, walking
    the cursor pages returns exactly the matching alerts in the query's order, each once; grouped pages return
    each patient once, in the order of its first alert, with all its matching alerts; counts per status and
    group agree with the statuses."""
    rng = random.Random(20240401)
    resources = []
    for j in range(12):
        patient = f"q{j}"
        if j % 3 == 0:
            resources.append(furosemide(f"ms-{patient}", patient))
        for n, hours in enumerate((j, j + 30)):
            value = rng.choice([2.7, 2.9, 3.1, 3.3])
            resources.append(potassium(f"k-{patient}-{n}", patient, value, T0 + timedelta(hours=hours)))
    seed(store, resources)
    index = ReviewIndex(store)
    index.sync()
    ids = [s["id"] for s in index.list(Query(status="all", limit=500)).items]
    assert len(ids) >= 12
    now = datetime.now(UTC)
    for alert_id in ids:
        alert = store.find_alert(alert_id)
        choice = rng.choice(["none", "acknowledge", "override", "snooze", "accept", "escalate", "expire"])
        if choice in ("acknowledge", "accept"):
            store.transition(alert_id, choice, "user:p", now)
        elif choice == "override":
            store.transition(alert_id, "override", "user:p", now, reason={"code": "goals-of-care"})
        elif choice == "snooze":
            store.transition(alert_id, "snooze", "user:p", now, until=now + timedelta(hours=4))
        elif choice == "escalate":
            store.transition(alert_id, "override", "user:p", now, reason={"code": "goals-of-care"})
            escalate(store, alert_id, "potassium below 3.0")
        elif choice == "expire":
            close(store, alert_id, "expired", "aged out")
        assert alert is not None
    index.sync()
    summaries = [summarize(a["patient"], a) for a in (store.find_alert(i) for i in ids) if a]
    counts = index.counts()
    for bucket in BUCKETS:
        assert counts[bucket] == sum(Query(status=bucket).matches(s) for s in summaries), bucket
    for _ in range(60):
        query = Query(
            status=rng.choice(BUCKETS),
            severity=rng.choice([None, *SEVERITIES]),
            sort=rng.choice(SORTS),
            limit=rng.randint(1, 4),
            group=rng.random() < 0.5,
        )
        expected = _reference(query, summaries)
        walked, cursor = [], None
        for _page in range(100):
            page = index.list_patients(query, cursor) if query.group else index.list(query, cursor)
            walked += page.groups if query.group else page.items
            cursor = page.next_cursor
            if cursor is None:
                break
        if query.group:
            patients = list(dict.fromkeys(s["patient"] for s in expected))
            assert [g["patient"] for g in walked] == patients, query
            for group in walked:
                assert [a["id"] for a in group["alerts"]] == [
                    s["id"] for s in expected if s["patient"] == group["patient"]
                ]
        else:
            assert [s["id"] for s in walked] == [s["id"] for s in expected], query
