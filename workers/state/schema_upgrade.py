"""Reading what an older release stored: timeline facts and alerts carry ``schema_version``; readers pass
every stored record through :func:`upgrade_fact` / :func:`upgrade_alert` before using it.

When a release changes the stored shape of a fact or an alert it must:
1. bump ``rules.facts.FACT_SCHEMA_VERSION`` or ``workers.state.store.ALERT_SCHEMA_VERSION``;
2. register a step here that turns version N into N+1 (``_FACT_STEPS[N]`` / ``_ALERT_STEPS[N]``);
3. keep the older fixtures under ``tests/fixtures/`` readable (``tests/test_schema_upgrade.py``).

Upgrades happen on read (records are rewritten in the new shape the next time the pipeline writes them).
A record newer than this release understands (a rollback after an upgrade) is refused loudly with
:class:`SchemaTooNewError` rather than half-read. Changes to fields the Lua scripts read in place (alert
``status``, ``history``, ``revision``, ``fingerprint``; fact ranks) also need the scripts to accept both shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rules.facts import FACT_SCHEMA_VERSION

Record = dict[str, Any]
Step = Callable[[Record], Record]

#: Records written before ``schema_version`` existed are the first format.
_FIRST_VERSION = 1


def _fact_1_to_2(record: Record) -> Record:
    """Facts before patient context: no encounter link, no reference range, no patient or encounter details."""
    for name in ("encounter", "reference_low", "reference_low_reported", "patient_info", "encounter_info"):
        record.setdefault(name, None)
    return record


#: version N -> function returning the record in version N+1.
_FACT_STEPS: dict[int, Step] = {1: _fact_1_to_2}
_ALERT_STEPS: dict[int, Step] = {}


class SchemaTooNewError(ValueError):
    """A stored record written by a newer release than this one."""


def alert_schema_version() -> int:
    """The alert format this release writes."""
    from workers.state.store import ALERT_SCHEMA_VERSION

    return ALERT_SCHEMA_VERSION


def _upgrade(record: Record, kind: str, current: int, steps: dict[int, Step]) -> Record:
    version = record.get("schema_version", _FIRST_VERSION)
    if not isinstance(version, int) or version < _FIRST_VERSION:
        raise ValueError(f"stored {kind} has an invalid schema_version {version!r}")
    if version > current:
        raise SchemaTooNewError(
            f"stored {kind} has schema_version {version}, newer than this release reads ({current}); "
            "upgrade ehr-alerts instead of rolling back"
        )
    while version < current:
        if version not in steps:
            raise RuntimeError(f"no upgrade step for {kind} schema_version {version} -> {version + 1}")
        record = steps[version](dict(record))
        version += 1
        record["schema_version"] = version
    return record


def upgrade_fact(record: Record) -> Record:
    """A stored fact (JSON object) in the current format."""
    return _upgrade(record, "fact", FACT_SCHEMA_VERSION, _FACT_STEPS)


def upgrade_alert(record: Record) -> Record:
    """A stored alert (JSON object) in the current format."""
    return _upgrade(record, "alert", alert_schema_version(), _ALERT_STEPS)


def missing_steps() -> list[str]:
    """Upgrade steps a bumped version forgot to register (must be empty)."""
    missing = [f"fact {v}->{v + 1}" for v in range(_FIRST_VERSION, FACT_SCHEMA_VERSION) if v not in _FACT_STEPS]
    missing += [f"alert {v}->{v + 1}" for v in range(_FIRST_VERSION, alert_schema_version()) if v not in _ALERT_STEPS]
    return missing
