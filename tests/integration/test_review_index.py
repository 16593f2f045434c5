"""The worklist index on a real Redis: incremental sync, revision guard, rebuild."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from review_support import seed, ward

from workers.state.review_index import Query, ReviewIndex, summary_key

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
