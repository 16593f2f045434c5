"""Cards that came from a CDS Hooks call alone (no stored alert for that rule episode yet).

Why a separate index and not the alert store: the call's data is the EHR's transient view, not the ingested
stream. Writing alerts from it would bypass the timeline's version ordering and open alerts the stream never
sees the facts of, so it could never resolve them. Instead each such episode gets a uuid kept in Redis
(keyed by patient and rule, refreshed on every call that fires, expiring after ``cds_card_ttl_hours``), and a
card record under that uuid so ``/feedback`` can find it and keep its outcome and history. When the stream
later opens an alert for the same rule, the card uuid becomes the alert id.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
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

    def episodes(
        self, patient: str, cards: dict[str, dict[str, Any]], ended: list[str], now: datetime
    ) -> dict[str, dict[str, Any]]:
        """Records of the open episodes of the rules in ``cards`` (rule id -> card body) for ``patient``, created
        when new, with the card as their latest content and their expiry pushed back; the episodes of the rules
        in ``ended`` are closed (the card records stay for late feedback). Three round trips in all."""
        rules = sorted(cards)
        pipe = self.client.pipeline(transaction=False)
        fresh = {rule: str(uuid.uuid4()) for rule in rules}
        for rule in rules:
            pipe.set(self._episode_key(patient, rule), fresh[rule], nx=True, ex=self.ttl)
            pipe.get(self._episode_key(patient, rule))
        replies = pipe.execute() if rules else []
        ids = {rule: replies[2 * i + 1] or fresh[rule] for i, rule in enumerate(rules)}
        existing = self.client.mget([self._card_key(ids[r]) for r in rules]) if rules else []
        records: dict[str, dict[str, Any]] = {}
        pipe = self.client.pipeline(transaction=False)
        for rule, raw in zip(rules, existing, strict=True):
            record = orjson.loads(raw) if raw else None
            if record is None:
                record = {
                    "id": ids[rule],
                    "patient": patient,
                    "rule_id": rule,
                    "status": "active",
                    "opened_at": now.isoformat(),
                    "history": [],
                    "feedback_keys": [],
                }
            record["card"] = cards[rule]
            record["seen_at"] = now.isoformat()
            records[rule] = record
            pipe.set(self._episode_key(patient, rule), ids[rule], ex=self.ttl)
            pipe.set(self._card_key(ids[rule]), orjson.dumps(record), ex=self.ttl)
        for rule in ended:
            pipe.delete(self._episode_key(patient, rule))
        if rules or ended:
            pipe.execute()
        return records

    def get(self, card_uuid: str) -> dict[str, Any] | None:
        """A card record by uuid."""
        raw = self.client.get(self._card_key(card_uuid))
        return orjson.loads(raw) if raw else None

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
                    record = orjson.loads(raw)
                    if key in record["feedback_keys"]:
                        return record
                    record["status"] = status
                    record["history"].append(entry)
                    record["feedback_keys"].append(key)
                    ttl = pipe.ttl(card_key)
                    pipe.multi()
                    pipe.set(card_key, orjson.dumps(record), ex=ttl if isinstance(ttl, int) and ttl > 0 else self.ttl)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue
