"""Access AuditEvents in Redis: one stream of FHIR R4 AuditEvent JSON (time-ordered ids), and per patient a
sorted set of the stream ids that name the patient, so both "everything between T1 and T2" and "who saw
patient P between T1 and T2" are range reads.

Durable as Redis is (AOF in production: ``appendonly yes``); kept ``EHR_ALERTS_AUDIT_RETENTION_DAYS``:
every append trims the stream (``XADD MINID ~``) and the patient's index, and an index key expires when
its patient has not been accessed for the retention period. Keys share the hash tag ``{audit}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis

from config.settings import get_settings
from workers.state.scripts import load_script

DAY_MS = 86_400_000
_PAGE = 500


def events_key() -> str:
    """The stream of AuditEvents."""
    return f"{get_settings().key_prefix}:{{audit}}:events"


def patient_key(patient: str) -> str:
    """The sorted set of stream ids naming ``patient`` (score: recorded time, ms)."""
    return f"{get_settings().key_prefix}:{{audit}}:patient:{patient}"


@cache
def _script(client: redis.Redis) -> Any:
    return load_script(client, "audit_record.lua")


def retention_ms() -> int:
    """How long events are kept, in milliseconds."""
    return int(get_settings().audit_retention_days * DAY_MS)


def record(client: redis.Redis, event: dict[str, Any], patients: Iterable[str], recorded_ms: int) -> str:
    """Append ``event`` (an AuditEvent as JSON-ready dict) naming ``patients``; returns its stream id."""
    keep = retention_ms()
    keys = [events_key(), *(patient_key(p) for p in sorted(set(patients)))]
    args = [json.dumps(event, separators=(",", ":")), recorded_ms, recorded_ms - keep, keep]
    return str(_script(client)(keys=keys, args=args))


@dataclass(frozen=True)
class AuditQuery:
    """Events recorded in [start_ms, end_ms), optionally only those naming ``patient``."""

    start_ms: int
    end_ms: int
    patient: str | None = None


def query(client: redis.Redis, q: AuditQuery) -> Iterator[dict[str, Any]]:
    """The matching events, oldest first, read page by page."""
    if q.patient is None:
        yield from _range(client, q.start_ms, q.end_ms)
        return
    offset = 0
    while True:
        ids = client.zrangebyscore(patient_key(q.patient), q.start_ms, f"({q.end_ms}", start=offset, num=_PAGE)
        if not ids:
            return
        pipe = client.pipeline(transaction=False)
        for stream_id in ids:
            pipe.xrange(events_key(), stream_id, stream_id)
        for found in pipe.execute():
            for _, fields in found:  # an id already trimmed by retention yields nothing
                yield json.loads(fields["e"])
        offset += len(ids)


def _range(client: redis.Redis, start_ms: int, end_ms: int) -> Iterator[dict[str, Any]]:
    low = f"{start_ms}-0"
    high = f"{max(start_ms, end_ms - 1)}-18446744073709551615"
    if end_ms <= start_ms:
        return
    while True:
        page = client.xrange(events_key(), low, high, count=_PAGE)
        for _, fields in page:
            yield json.loads(fields["e"])
        if len(page) < _PAGE:
            return
        low = "(" + page[-1][0]
