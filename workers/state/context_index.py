"""Who and where each patient is, for the review worklist: one small JSON per patient, kept from the patient's own
Patient and Encounter facts (the timeline stays the source of truth; this index only lets the worklist show,
search and filter patients without reading every timeline).

The pipeline rewrites a patient's entry after a batch that stored or deleted one of the patient's Patient or
Encounter resources, or pruned one (``update_for``); a write computed from an older timeline version never
replaces a newer one (``context_upsert.lua``). The encounter shown is the one in progress at the patient's clock.
PHI (name, MRN, birth date): read by signed-in review users only, never logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import redis

from rules.context import PatientContext
from rules.facts import Fact
from workers.events import Event
from workers.state import keys
from workers.state.scripts import load_script, run_pipelined
from workers.state.timeline import PatientWindow

_CONTEXT_TYPES = ("Patient/", "Encounter/")
_NEVER = datetime.min.replace(tzinfo=UTC)  # no clock yet: no encounter is in progress


def summary(facts: Iterable[Fact], at: datetime | None) -> dict[str, Any] | None:
    """The worklist's view of a patient from their facts (None: nothing known)."""
    context = PatientContext.of(list(facts), at or _NEVER)
    info = context.patient.patient_info if context.patient else None
    current = context.current.encounter_info if context.current else None
    if info is None and current is None:
        return None
    out: dict[str, Any] = {}
    if info is not None:
        out |= {"name": info.name, "mrn": info.mrns[0] if info.mrns else None, "birth_date": info.birth_date,
                "sex": info.gender}  # fmt: skip
    if current is not None:
        out |= {"ward": current.ward, "bed": current.bed, "class": current.class_code}
    return {k: v for k, v in out.items() if v is not None}


def touches_context(events: Sequence[Event], window: PatientWindow) -> bool:
    """True when the patient's context may have changed in a batch: it stored, deleted or pruned one of the
    patient's Patient / Encounter resources, or the patient has context (the clock may have passed an encounter's
    end)."""
    names = [e.resource for e, status in zip(events, window.statuses, strict=False) if status == "stored"]
    names += [*window.pruned, *window.resources]
    return any(name.startswith(_CONTEXT_TYPES) for name in names)


def final_facts(events: Sequence[Event], window: PatientWindow) -> list[Fact]:
    """The patient's context facts after the batch: the window's, with the batch's stored versions on top."""
    resources = {name: stored.facts for name, stored in window.resources.items() if name.startswith(_CONTEXT_TYPES)}
    for event, status in zip(events, window.statuses, strict=False):
        if status == "stored" and event.resource.startswith(_CONTEXT_TYPES):
            resources[event.resource] = tuple(event.facts)
    for name in window.pruned:
        resources.pop(name, None)
    return [fact for facts in resources.values() for fact in facts]


class ContextIndex:
    """Reads and writes the patient context index."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._upsert = load_script(client, "context_upsert.lua")

    def write(self, entries: Sequence[tuple[str, int, dict[str, Any] | None]]) -> None:
        """(patient, timeline version, summary or None) for each patient, in one round trip."""
        key = keys.patient_context()
        calls = [([key], [p, v, json.dumps(s, separators=(",", ":")) if s else ""]) for p, v, s in entries]
        for result in run_pipelined(self.client, self._upsert, calls):
            if isinstance(result, Exception):
                raise result

    def get_many(self, patients: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The known patients among ``patients``."""
        if not patients:
            return {}
        values = self.client.hmget(keys.patient_context(), list(patients))
        return {p: parsed for p, v in zip(patients, values, strict=True) if (parsed := _parse(v)) is not None}

    def scan(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every known patient (HSCAN: bounded work per round trip)."""
        for patient, value in self.client.hscan_iter(keys.patient_context(), count=500):
            parsed = _parse(value)
            if parsed is not None:
                yield patient, parsed

    def any(self) -> bool:
        """True once any patient context was stored."""
        return bool(self.client.exists(keys.patient_context()))


def _parse(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    _, _, body = value.partition("\t")
    return json.loads(body) if body else None
