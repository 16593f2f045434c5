"""Cards that came from a CDS Hooks call alone (no stored alert for that rule episode yet).

Why a separate index and not the alert store: the call's data is the EHR's transient view, not the ingested
stream. Writing alerts from it would bypass the timeline's version ordering and open alerts the stream never
sees the facts of, so it could never resolve them. Instead each such episode gets a uuid kept in Redis, with a
card record (and what the card rests on) so ``/feedback`` can find it. When the stream later opens an alert
for the same rule, the card uuid stays the uuid the EHR holds (:mod:`service.cds.handover`). When an EHR user
accepts or overrides such a card first, the episode is handled by a person, and :mod:`service.cds.feedback`
records it in the alert store as an alert of that rule and patient under the card uuid (so the pharmacist sees
it in the worklist, the audit export and the analytics).

Layout (one hash tag per patient, so the Lua script touches one slot, also on Redis Cluster):

- ``<prefix>:cds:{p:<patient>}:episodes`` hash: rule id -> uuid of the open request-only episode;
- ``<prefix>:cds:{p:<patient>}:cards`` hash: ``<uuid>`` -> record (status, ...), ``<uuid>:card`` -> the latest
  card body (opaque JSON), ``<uuid>:alert`` -> what the latest card rests on (severity, evidence, explanation,
  rule version, as-of, the hook and user that saw it);
- ``<prefix>:cds:card:<uuid>`` string: the patient, so feedback finds the record from the uuid alone.

Both hashes expire ``cds_card_ttl_hours`` after the patient's last call; a call costs one round trip (plus one
when an episode is new). An episode ends when its rule no longer fires; its record stays for late feedback.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
import redis

from config.settings import Settings

# KEYS: episodes hash, cards hash. ARGV: now, ttl seconds, json [[rule, fresh uuid, card json, alert json], ...],
# json [ended rule, ...], patient. Returns a flat list: uuid, status, created (1/0) per item.
_EPISODES = """
local episodes, cards = KEYS[1], KEYS[2]
local now, ttl = ARGV[1], tonumber(ARGV[2])
local items, ended, patient = cjson.decode(ARGV[3]), cjson.decode(ARGV[4]), ARGV[5]
local out = {}
for _, item in ipairs(items) do
  local rule, fresh, card, alert = item[1], item[2], item[3], item[4]
  local id = redis.call('HGET', episodes, rule)
  local raw = id and redis.call('HGET', cards, id)
  local record, created
  if raw then
    record, created = cjson.decode(raw), 0
  else
    id, created = fresh, 1
    record = {id = id, patient = patient, rule_id = rule, status = 'active', opened_at = now}
    redis.call('HSET', episodes, rule, id)
  end
  record.seen_at = now
  redis.call('HSET', cards, id, cjson.encode(record), id .. ':card', card, id .. ':alert', alert)
  table.insert(out, id)
  table.insert(out, record.status)
  table.insert(out, created)
end
for _, rule in ipairs(ended) do redis.call('HDEL', episodes, rule) end
redis.call('EXPIRE', episodes, ttl)
redis.call('EXPIRE', cards, ttl)
return out
"""

# KEYS: episodes hash, cards hash. ARGV: ttl seconds, json [[rule, alert id], ...]. For each stored alert, the
# request-only episode it took over: the link kept from an earlier call, else the rule's open episode, adopted
# now (linked to the alert, no longer open). Returns a flat list: alert id, card uuid, record json ('' if the
# link is older than this call) per linked alert.
_ADOPT = """
local episodes, cards = KEYS[1], KEYS[2]
local ttl, items = tonumber(ARGV[1]), cjson.decode(ARGV[2])
local out = {}
for _, item in ipairs(items) do
  local rule, alert = item[1], item[2]
  local link = 'alert:' .. alert
  local id = redis.call('HGET', cards, link)
  if id then
    table.insert(out, alert); table.insert(out, id); table.insert(out, '')
  else
    id = redis.call('HGET', episodes, rule)
    local raw = id and redis.call('HGET', cards, id)
    if raw then
      local record = cjson.decode(raw)
      record.alert_id = alert
      raw = cjson.encode(record)
      redis.call('HSET', cards, id, raw, link, id)
      redis.call('HDEL', episodes, rule)
      table.insert(out, alert); table.insert(out, id); table.insert(out, raw)
    end
  end
end
if #out > 0 then
  redis.call('EXPIRE', episodes, ttl)
  redis.call('EXPIRE', cards, ttl)
end
return out
"""


class CardIndex:
    """Request-only card episodes in Redis."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.prefix = settings.key_prefix
        self.ttl = int(settings.cds_card_ttl_hours * 3600)
        self._episodes = client.register_script(_EPISODES)
        self._adopt = client.register_script(_ADOPT)

    def _keys(self, patient: str) -> list[str]:
        tag = f"{self.prefix}:cds:{{p:{patient}}}"
        return [f"{tag}:episodes", f"{tag}:cards"]

    def _pointer(self, card_uuid: str) -> str:
        return f"{self.prefix}:cds:card:{card_uuid}"

    def episodes(
        self,
        patient: str,
        cards: dict[str, tuple[dict[str, Any], dict[str, Any]]],
        ended: list[str],
        now: datetime,
    ) -> dict[str, dict[str, Any]]:
        """Records (id, status) of the open episodes of the rules in ``cards`` (rule id -> (card body, what it
        rests on)) for ``patient``, created when new, with the card as their latest content; the episodes of
        the rules in ``ended`` are closed (their records stay for late feedback)."""
        if not cards and not ended:
            return {}
        items = [
            [rule, str(uuid.uuid4()), orjson.dumps(card).decode(), orjson.dumps(alert).decode()]
            for rule, (card, alert) in sorted(cards.items())
        ]
        reply = self._episodes(
            keys=self._keys(patient),
            args=[now.isoformat(), self.ttl, orjson.dumps(items), orjson.dumps(ended), patient],
        )
        records: dict[str, dict[str, Any]] = {}
        created = []
        for i, (rule, *_) in enumerate(items):
            card_uuid, status, new = reply[3 * i], reply[3 * i + 1], int(reply[3 * i + 2])
            records[rule] = {"id": card_uuid, "rule_id": rule, "status": status}
            if new:
                created.append(card_uuid)
        if created:
            pipe = self.client.pipeline(transaction=False)
            for card_uuid in created:
                pipe.set(self._pointer(card_uuid), patient, ex=self.ttl * 4)  # outlives the records' expiry
            pipe.execute()
        return records

    def adopt(self, patient: str, alerts: dict[str, str]) -> dict[str, tuple[str, dict[str, Any] | None]]:
        """Link the stream's open alerts (rule id -> alert id) to the request-only episodes they continue.

        Returns alert id -> (the card uuid the EHR already holds for that episode, the episode's record when
        it was adopted by this call, else None); alerts with no such episode are left out."""
        if not alerts:
            return {}
        reply = self._adopt(keys=self._keys(patient), args=[self.ttl, orjson.dumps(sorted(alerts.items()))])
        return {
            reply[i]: (reply[i + 1], _read(reply[i + 2]) if reply[i + 2] else None) for i in range(0, len(reply), 3)
        }

    def get(self, card_uuid: str) -> dict[str, Any] | None:
        """A card record by uuid, or None when unknown or expired: with its latest ``card`` body, ``alert``
        (what the card rests on) and ``open`` (the episode is still the rule's open request-only episode)."""
        patient = self.client.get(self._pointer(card_uuid))
        if not patient:
            return None
        episodes, cards = self._keys(patient)
        raw, card, alert = self.client.hmget(cards, [card_uuid, f"{card_uuid}:card", f"{card_uuid}:alert"])
        if not raw:
            return None
        record = _read(raw)
        record["card"] = orjson.loads(card) if card else None
        record["alert"] = orjson.loads(alert) if alert else {}
        record["open"] = self.client.hget(episodes, record.get("rule_id", "")) == card_uuid
        return record


def _read(raw: str | bytes) -> dict[str, Any]:
    record = orjson.loads(raw)
    if record.get("history") in (None, {}):  # Lua's cjson writes an empty array as {}
        record["history"] = []
    return record
