"""Shared helpers for the review tests: seed alerts through the real pipeline code on a real Redis, and an
in-process app whose settings point at that Redis and trust the test review issuer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from auth_helpers import review_env, review_headers
from fastapi.testclient import TestClient
from itest_builders import furosemide, potassium

from config.settings import get_settings
from service.ingest import Enqueuer, Ingested, ingest_items
from workers.events import dump_batch
from workers.pipeline import get_store, process_batch
from workers.state.connection import get_redis

T0 = datetime(2024, 4, 1, 6, 0, tzinfo=UTC)
HYPOK = "hypokalemia-without-magnesium"
REFRACTORY = "refractory-hypokalemia-on-diuretic"


class _Direct(Enqueuer):
    """Sends each flushed batch straight to ``process_batch`` (the Celery task's body) on ``store``."""

    def __init__(self, store: Any) -> None:
        super().__init__(batch_size=1)
        self.store = store

    def flush(self) -> None:
        if self.pending:
            process_batch(dump_batch(self.pending), self.store)
            self.pending = []


def seed(store: Any, resources: list[dict[str, Any]]) -> None:
    """Push FHIR resources one by one through ingestion -> normalise -> timeline -> rules -> alerts."""
    enqueuer = _Direct(store)
    ingest_items([(f"r{i}", r) for i, r in enumerate(resources)], enqueuer, Ingested())
    enqueuer.flush()


def ward() -> list[dict[str, Any]]:
    """The known data set: 7 patients, 6 alerts.

    p1: K 3.1 (T0-30h) then 2.8 (T0) on furosemide -> hypokalemia warning + refractory warning
    p2: K 3.2 at T0+1h -> info;  p3: K 3.3 at T0+2h -> info;  p4: K 2.9 at T0+3h -> warning
    p5: K 3.4 at T0+4h -> info;  p6: K 4.0, p7: K 4.2 -> no alert (patients seen, no alert)
    """
    return [
        furosemide("ms-p1", "p1"),
        potassium("k-p1-a", "p1", 3.1, T0 - timedelta(hours=30)),
        potassium("k-p1-b", "p1", 2.8, T0),
        potassium("k-p2", "p2", 3.2, T0 + timedelta(hours=1)),
        potassium("k-p3", "p3", 3.3, T0 + timedelta(hours=2)),
        potassium("k-p4", "p4", 2.9, T0 + timedelta(hours=3)),
        potassium("k-p5", "p5", 3.4, T0 + timedelta(hours=4)),
        potassium("k-p6", "p6", 4.0, T0 + timedelta(hours=5)),
        potassium("k-p7", "p7", 4.2, T0 + timedelta(hours=6)),
    ]


def _clear_caches() -> None:
    get_settings.cache_clear()
    get_redis.cache_clear()
    get_store.cache_clear()


@contextmanager
def review_client(monkeypatch: pytest.MonkeyPatch, redis_url: str, prefix: str, tmp: Path) -> Iterator[TestClient]:
    """The app in process on the test Redis, trusting the test review issuer."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("EHR_ALERTS_KEY_PREFIX", prefix)
    for name, value in review_env(tmp).items():
        monkeypatch.setenv(name, value)
    _clear_caches()
    from service.app import app

    try:
        with TestClient(app, base_url="https://testserver") as client:
            yield client
    finally:
        _clear_caches()


def as_user(sub: str, *roles: str) -> dict[str, str]:
    """Authorization header of a review token for ``sub`` with ``roles``."""
    return review_headers(sub, list(roles))
