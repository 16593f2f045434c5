"""Time alone closes alerts: patients whose decisions can change by time alone (evidence leaving a look-back,
a future-dated result coming due) are re-evaluated at that time.

Each evaluation records the earliest such time as the patient's due time (``<prefix>:{due}:patients``). Every
worker sweeps that index every ``due_sweep_interval`` seconds: it claims the patients due by now (a Lua claim
with a lease, so one sweeper ticks each) and submits a *tick* event for each through the inbox, the durable path
every event takes. A tick lets the patient's time run up to its instant, evaluating at each due time on the way
(``workers.steps``), and the evaluation writes the next due time. No scan of every patient.

Each sweep also applies the closed-alert retention (``retention_closed_alert_days``): at most ``PRUNE_LIMIT``
alerts closed longer ago than that are removed, with their history list, alert-index entries and worklist
summaries (``keys.closed_alerts`` orders closed alerts by when they closed), and the inactive-patient retention
(``retention_inactive_patient_days``): at most ``PRUNE_LIMIT`` patients silent that long with no alert left are
forgotten, ``PRUNE_LIMIT`` resources each per sweep (``keys.patients_seen`` orders patients by their last write).

While ``ehr-alerts replay`` declares the feed's own clock (``keys.feed_clock``), sweeps wait: the replay lets
time run itself at the end of the feed, so a historical extract is judged by its own time, not today's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis

from workers import inbox
from workers.events import dump_batch, tick
from workers.state import keys, review_index
from workers.state.scripts import load_script
from workers.state.store import Store

#: Seconds a claimed patient is left alone before another sweep may tick it again (its tick rewrites it).
LEASE_SECONDS = 300
CLAIM_LIMIT = 1000
#: Closed alerts one sweep may remove (retention; bounded work per sweep).
PRUNE_LIMIT = 100


def claim(client: redis.Redis, now: datetime, limit: int = CLAIM_LIMIT) -> list[str]:
    """The patients due by ``now``, claimed for ``LEASE_SECONDS``."""
    script = load_script(client, "claim_due.lua")
    return list(script(keys=[keys.due_patients()], args=[now.timestamp(), now.timestamp() + LEASE_SECONDS, limit]))


def submit_ticks(client: redis.Redis, patients: list[str], until: datetime, settings: Any) -> None:
    """Queue a tick up to ``until`` for each patient, in inbox batches of ``batch_size``."""
    size = settings.batch_size
    for start in range(0, len(patients), size):
        batch = [tick(patient, until) for patient in patients[start : start + size]]
        inbox.submit(client, dump_batch(batch), settings.redelivery_timeout)


def sweep(client: redis.Redis, settings: Any, now: datetime | None = None) -> int:
    """Tick every patient due by now (wall clock); returns how many. Does nothing while a replay declares the
    feed's clock, except the closed-alert retention (counted in wall-clock time since each alert closed)."""
    now = now or datetime.now(UTC)
    apply_retention(Store(client, settings), now)
    if client.exists(keys.feed_clock()):
        return 0
    patients = claim(client, now)
    submit_ticks(client, patients, now, settings)
    return len(patients)


def apply_retention(store: Store, now: datetime, limit: int = PRUNE_LIMIT) -> tuple[int, int]:
    """One bounded step of the retention of what no event prunes: index what an older release stored (a no-op
    once done), remove at most ``limit`` closed alerts past their retention, forget at most ``limit`` inactive
    patients. Returns (alerts removed, patients forgotten)."""
    store.backfill_retention_indexes(now)
    return prune_closed_alerts(store, now, limit), retire_inactive_patients(store, now, limit)


def retire_inactive_patients(store: Store, now: datetime, limit: int = PRUNE_LIMIT) -> int:
    """Forget at most ``limit`` patients silent for ``retention_inactive_patient_days`` with no alert left
    (``Store.retire_inactive_patients``); returns how many were forgotten completely."""
    return len(store.retire_inactive_patients(now, limit))


def prune_closed_alerts(store: Store, now: datetime, limit: int = PRUNE_LIMIT) -> int:
    """Remove at most ``limit`` alerts closed longer than ``retention_closed_alert_days`` ago, with their index
    entries and worklist summaries; returns how many. Every sweep removes a bounded number, so a backlog
    (a first run after an upgrade, a lowered retention) drains over successive sweeps."""
    gone = store.prune_closed_alerts(now, limit)
    review_index.forget(store.client, [alert_id for _, alert_id in gone])
    return len(gone)


def due_by(client: redis.Redis, until: datetime) -> list[str]:
    """Every patient due by ``until`` (no claim: for a replay settling its own feed)."""
    return list(client.zrangebyscore(keys.due_patients(), "-inf", until.timestamp()))
