"""The inbox: every accepted batch is kept in Redis until a worker has finished it.

Why it exists: kombu's Redis transport takes a message off the queue with BRPOP and only then, in a
second round trip, copies it into its ``unacked`` hash. A worker killed between the two (SIGKILL, OOM
kill, power loss) loses the message for good: it is neither on the queue nor in ``unacked``, so the
visibility timeout never restores it (proved by ``tests/integration/test_delivery.py::
test_message_popped_by_a_frozen_worker_is_not_lost``). kombu has no BLMOVE-style atomic hand-over.

So the Celery message is only a doorbell carrying a batch id; the events live here:

- ``submit`` writes the batch and its due time in one MULTI, then publishes the doorbell. The HTTP
  answer (202) is sent only after both, so an accepted event is always in the inbox.
- the task ``claim``s the batch (no payload: an earlier delivery finished it, the doorbell is a no-op),
  processes it, and ``finish``es it (deletes it) only afterwards.
- ``sweep`` (run every few seconds by each worker) re-publishes the doorbell of every batch still in
  the inbox ``redelivery_timeout`` seconds after it was submitted or last re-published, whatever was
  lost on the way (the producer died after writing the inbox, the message was lost in the BRPOP
  window, a restore never happened). Re-publishing is claimed atomically in Lua per batch, so several
  workers sweeping at once publish one doorbell per batch and period.

Processing is idempotent (the timeline upsert and the alert store are version-checked), so a doorbell
rung twice costs one extra round trip, and a batch processed twice gives the same alerts.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from workers.state import keys

_SWEEP_LUA = (Path(__file__).parent / "state" / "lua" / "inbox_due.lua").read_text(encoding="utf-8")


def submit(client: redis.Redis, events: list[dict[str, Any]], redelivery_timeout: float) -> str:
    """Keep a batch in the inbox and ring its doorbell; returns the batch id."""
    from workers.tasks import process_inbox_batch  # the task module imports this one

    batch_id = uuid.uuid4().hex
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.inbox_batches(), batch_id, json.dumps(events, separators=(",", ":")))
    pipe.zadd(keys.inbox_due(), {batch_id: time.time() + redelivery_timeout})
    pipe.execute()
    process_inbox_batch.delay(batch_id)
    return batch_id


def claim(client: redis.Redis, batch_id: str) -> list[dict[str, Any]] | None:
    """The events of a batch still in the inbox (None: already finished)."""
    payload = client.hget(keys.inbox_batches(), batch_id)
    return None if payload is None else json.loads(payload)


def finish(client: redis.Redis, batch_id: str, *, dead_letter: str | None = None) -> None:
    """Remove a processed batch (and, atomically with it, write its dead-letter record if it failed)."""
    pipe = client.pipeline(transaction=True)
    if dead_letter is not None:
        pipe.rpush(keys.dead_letters(), dead_letter)
    pipe.hdel(keys.inbox_batches(), batch_id)
    pipe.zrem(keys.inbox_due(), batch_id)
    pipe.execute()


def due(client: redis.Redis, redelivery_timeout: float, limit: int = 500) -> list[str]:
    """Claim the batches overdue now: their next due time moves one timeout on; returns their ids."""
    now = time.time()
    ids = client.eval(_SWEEP_LUA, 2, keys.inbox_due(), keys.inbox_batches(), now, now + redelivery_timeout, limit)
    return [i.decode() if isinstance(i, bytes) else i for i in ids]


def sweep(client: redis.Redis, redelivery_timeout: float) -> int:
    """Re-publish the doorbell of every overdue batch; returns how many."""
    from workers.tasks import process_inbox_batch

    ids = due(client, redelivery_timeout)
    for batch_id in ids:
        process_inbox_batch.delay(batch_id)
    return len(ids)


def size(client: redis.Redis) -> int:
    """Batches accepted and not yet finished."""
    return int(client.hlen(keys.inbox_batches()))
