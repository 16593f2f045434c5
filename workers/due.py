"""Time alone closes alerts: patients whose decisions can change by time alone (evidence leaving a look-back,
a future-dated result coming due) are re-evaluated at that time.

Each evaluation records the earliest such time as the patient's due time (``<prefix>:{due}:patients``). Every
worker sweeps that index every ``due_sweep_interval`` seconds: it claims the patients due by now (a Lua claim
with a lease, so one sweeper ticks each) and submits a *tick* event for each through the inbox, the durable path
every event takes. A tick lets the patient's time run up to its instant, evaluating at each due time on the way
(``workers.steps``), and the evaluation writes the next due time. No scan of every patient.

While ``ehr-alerts replay`` declares the feed's own clock (``keys.feed_clock``), sweeps wait: the replay lets
time run itself at the end of the feed, so a historical extract is judged by its own time, not today's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis

from workers import inbox
from workers.events import dump_batch, tick
from workers.state import keys
from workers.state.scripts import load_script

#: Seconds a claimed patient is left alone before another sweep may tick it again (its tick rewrites it).
LEASE_SECONDS = 300
CLAIM_LIMIT = 1000


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
    feed's clock."""
    if client.exists(keys.feed_clock()):
        return 0
    now = now or datetime.now(UTC)
    patients = claim(client, now)
    submit_ticks(client, patients, now, settings)
    return len(patients)


def due_by(client: redis.Redis, until: datetime) -> list[str]:
    """Every patient due by ``until`` (no claim: for a replay settling its own feed)."""
    return list(client.zrangebyscore(keys.due_patients(), "-inf", until.timestamp()))
