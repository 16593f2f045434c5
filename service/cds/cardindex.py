"""Cards that came from a CDS Hooks call alone (no stored alert for that rule episode yet).

Why a separate index and not the alert store: the call's data is the EHR's transient view, not the ingested
stream. Writing alerts from it would bypass the timeline's version ordering and open alerts the stream never
sees the facts of, so it could never resolve them. Instead each such episode gets a uuid kept in Redis
(keyed by patient and rule, refreshed on every call that fires, expiring after ``cds_card_ttl_hours``), and a
card record under that uuid so ``/feedback`` can find it and keep its outcome and history. When the stream
later opens an alert for the same rule, the card uuid becomes the alert id.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import redis

from workers.settings import Settings


class CardIndex:
    """Request-only card episodes in Redis."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.prefix = settings.key_prefix
        self.ttl = int(settings.cds_card_ttl_hours * 3600)

    def _episode_key(self, patient: str, rule_id: str) -> str:
        return f"{self.prefix}:cds:{{p:{patient}}}:episode:{rule_id}"

    def _card_key(self, card_uuid: str) -> str:
        return f"{self.prefix}:cds:card:{card_uuid}"

    def episode(self, patient: str, rule_id: str, card: dict[str, Any], now: datetime) -> dict[str, Any]:
        """The record of the open episode of ``rule_id`` for ``patient`` (created if none), with ``card`` as
        its latest content; the expiry is pushed back."""
        key = self._episode_key(patient, rule_id)
        fresh = str(uuid.uuid4())
        created = self.client.set(key, fresh, nx=True, ex=self.ttl)
        card_uuid = fresh if created else self.client.get(key) or fresh
        record = None if created else self.get(card_uuid)
        if record is None:
            record = {
                "id": card_uuid,
                "patient": patient,
                "rule_id": rule_id,
                "status": "active",
                "opened_at": now.isoformat(),
                "history": [],
                "feedback_keys": [],
            }
        record["card"] = card
        record["seen_at"] = now.isoformat()
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, card_uuid, ex=self.ttl)
        pipe.set(self._card_key(card_uuid), json.dumps(record), ex=self.ttl)
        pipe.execute()
        return record

    def end_episode(self, patient: str, rule_id: str) -> None:
        """The rule no longer fires: the next firing is a new episode (the card record stays for late feedback)."""
        self.client.delete(self._episode_key(patient, rule_id))

    def get(self, card_uuid: str) -> dict[str, Any] | None:
        """A card record by uuid."""
        raw = self.client.get(self._card_key(card_uuid))
        return json.loads(raw) if raw else None

    def record_feedback(self, card_uuid: str, status: str, entry: dict[str, Any], key: str) -> dict[str, Any] | None:
        """Set the card's status and append ``entry`` to its history, once per idempotency ``key``."""
        card_key = self._card_key(card_uuid)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(card_key)
                    raw = pipe.get(card_key)
                    if raw is None:
                        return None
                    record = json.loads(raw)
                    if key in record["feedback_keys"]:
                        return record
                    record["status"] = status
                    record["history"].append(entry)
                    record["feedback_keys"].append(key)
                    ttl = pipe.ttl(card_key)
                    pipe.multi()
                    pipe.set(card_key, json.dumps(record), ex=ttl if isinstance(ttl, int) and ttl > 0 else self.ttl)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue
