"""Shared helpers for the review tests: seed alerts through the real pipeline code on a real Redis, and an
in-process app whose settings point at that Redis and trust the test review issuer."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_helpers import review_env, review_headers
from fastapi.testclient import TestClient
from itest_builders import furosemide, potassium

from config.settings import get_settings
from service.ingest import Enqueuer, Ingested, ingest_items
from service.review import patients
from service.review.patients import PatientDisplay
from workers.events import dump_batch
from workers.pipeline import get_store, process_batch
from workers.state import keys
from workers.state.connection import get_redis

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_STREAM = ROOT / "examples" / "stream" / "events.ndjson"

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


def live_clock(store: Any) -> None:
    """Make the seeded alerts look raised by a live feed: ``created_at`` = the clinical opening time (a seeded
    alert is written now, long after its 2024 data), and mark them changed so the worklist index re-reads them."""
    for patient in store.client.smembers(keys.patients()):
        hash_key = keys.patient_keys(patient)["alerts"]
        for alert_id, raw in store.client.hgetall(hash_key).items():
            alert = json.loads(raw)
            alert["created_at"] = alert["opened_at"]
            store.client.hset(hash_key, alert_id, json.dumps(alert))
            store.client.zadd(keys.alert_index(), {f"{patient}|{alert_id}": time.time()})


def rewrite_alert(store: Any, alert_id: str, change: Any) -> dict[str, Any]:
    """Change a stored alert the way another writer would (``change(alert)`` edits it in place), and mark it
    changed for the worklist index. Stands in for writers other parts of the system own: the pipeline's
    escalation and closing statuses (issue 10) and the CDS engineer's request-only cards."""
    patient = store.client.hget(keys.alert_patients(), alert_id)
    hash_key = keys.patient_keys(patient)["alerts"]
    alert = json.loads(store.client.hget(hash_key, alert_id))
    change(alert)
    store.client.hset(hash_key, alert_id, json.dumps(alert))
    store.client.zadd(keys.alert_index(), {f"{patient}|{alert_id}": time.time()})
    return alert


def escalate(store: Any, alert_id: str, why: str, severity: str | None = None) -> dict[str, Any]:
    """What the pipeline writes when an alert escalates: back to active, with an ``escalated`` history entry."""

    def change(alert: dict[str, Any]) -> None:
        entry = {"action": "escalated", "by": "system", "at": alert.get("as_of"), "why": why}
        alert["history"].append({**entry, "from": alert["status"], "to": "active"})
        alert.update(status="active", snoozed_until=None, revision=alert["revision"] + 1)
        if severity:
            alert["severity"] = severity

    return rewrite_alert(store, alert_id, change)


def close(store: Any, alert_id: str, status: str, why: str) -> dict[str, Any]:
    """What the pipeline writes when an alert closes without its resolve condition (expired / withdrawn)."""

    def change(alert: dict[str, Any]) -> None:
        at = alert.get("as_of")
        alert["history"].append({"action": status, "by": "system", "at": at, "why": why})
        alert.update(status=status, closed_at=at, revision=alert["revision"] + 1)

    return rewrite_alert(store, alert_id, change)


def _version(rule_id: str) -> str:
    from workers.pipeline import get_catalog

    return next(r.version for r in get_catalog().rules if r.id == rule_id)


def cds_only_alert(store: Any, patient: str, rule_id: str, outcome: str, at: datetime) -> str:
    """A request-only CDS Hooks card made visible in the alert store with its feedback (what the CDS engineer
    writes): an alert with ``source`` ``cds-hooks`` and the EHR user's action in its history."""
    alert_id = str(uuid.uuid4())
    stamp = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    action = {"overridden": "override", "accepted": "accept"}[outcome]
    entry = {"action": action, "by": "ehr:https://ehr.test|dr-who", "at": stamp, "source": "cds-hooks"}
    if action == "override":
        entry["reason"] = {"code": "goals-of-care", "display": "Not in line with goals of care"}
    alert = {
        "schema_version": 1, "id": alert_id, "rule_id": rule_id, "rule_version": _version(rule_id), "patient": patient,
        "severity": "info", "card": {"summary": "Low K 3.3 mmol/L (from the EHR)"}, "evidence": [],
        "explanation": "Fires: from a CDS Hooks call", "as_of": stamp, "opened_at": stamp, "created_at": stamp,
        "updated_at": stamp, "status": outcome, "source": "cds-hooks", "revision": 2,
        "history": [{"action": "opened", "by": "system", "at": stamp, "why": "CDS Hooks call"}, entry],
    }  # fmt: skip
    store.client.hset(keys.patient_keys(patient)["alerts"], alert_id, json.dumps(alert))
    store.record({alert_id: patient}, patients={patient})
    return alert_id


# --- patient context: a fake directory behind the review page's seam ---------------------------------------------


class FakeDirectory:
    """A patient directory from a fixed set of people (what the patient-context work will provide from
    ingested Patient / Encounter resources)."""

    available = True

    def __init__(self, people: Iterable[PatientDisplay]) -> None:
        self.people = {p.id: p for p in people}

    def display(self, patient_ids: Iterable[str]) -> dict[str, PatientDisplay]:
        return {i: self.people[i] for i in patient_ids if i in self.people}

    def search(self, text: str, limit: int) -> list[str]:
        needle = text.strip().casefold()
        hits = [
            p.id
            for p in self.people.values()
            if (p.name and needle in p.name.casefold()) or (p.mrn and p.mrn.casefold() == needle)
        ]
        return sorted(hits)[:limit]

    def where(self, ward: str | None, encounter_class: str | None) -> set[str]:
        return {
            p.id
            for p in self.people.values()
            if (ward is None or p.ward == ward) and (encounter_class is None or p.encounter_class == encounter_class)
        }

    def wards(self) -> list[str]:
        return sorted({p.ward for p in self.people.values() if p.ward})


def display_of(
    resource: dict[str, Any], ward: str | None, bed: str | None, encounter_class: str | None
) -> PatientDisplay:
    """What a FHIR R4 Patient resource says about who the patient is (official name, MRN, birth date, sex)."""
    name = next(iter(resource.get("name") or []), {})
    shown = f"{name.get('family', '').upper()}, {' '.join(name.get('given') or [])}".strip(", ") or name.get("text")
    mrn = next((i.get("value") for i in resource.get("identifier") or [] if i.get("value")), None)
    born = date.fromisoformat(resource["birthDate"]) if resource.get("birthDate") else None
    return PatientDisplay(resource["id"], shown, mrn, born, resource.get("gender"), ward, bed, encounter_class)


#: a patient admitted during the shift (the browser test's new alert), not in the example stream
NEW_PATIENT = {
    "resourceType": "Patient", "id": "ex-mike", "identifier": [{"system": "https://ehr-alerts.dev/fhir/example-mrn",
    "value": "EX-MIKE"}], "name": [{"use": "official", "family": "Example", "given": ["Mike"]}], "gender": "male",
    "birthDate": "1949-02-03",
}  # fmt: skip


def example_directory() -> FakeDirectory:
    """The example stream's own Patient resources with the stays its Encounter resources place them in (and
    ``NEW_PATIENT``, in the emergency department)."""
    lines = EXAMPLE_STREAM.read_text(encoding="utf-8").splitlines()
    resources = [json.loads(line) for line in lines if line.strip()]
    stays = {}
    for stay in (r for r in resources if r["resourceType"] == "Encounter"):
        places = {
            entry["physicalType"]["coding"][0]["code"]: entry["location"]["display"] for entry in stay["location"]
        }
        stays[stay["subject"]["reference"].removeprefix("Patient/")] = (
            places.get("wa"),
            places.get("bd"),
            stay["class"]["code"],
        )
    people = [display_of(r, *stays[r["id"]]) for r in resources if r["resourceType"] == "Patient"]
    people.append(display_of(NEW_PATIENT, "ED", f"{len(people) + 1:02d}", "EMER"))
    return FakeDirectory(people)


def ward_directory() -> FakeDirectory:
    """People for ``ward()``: p1-p4 on Ward 5B (inpatients), p5-p7 in the emergency department."""
    names = ["DOE, Jane", "ROE, Richard", "MOE, Anna", "POE, Edgar", "LOW, Karl", "HIGH, Mia", "MID, Ola"]
    return FakeDirectory(
        PatientDisplay(
            f"p{i}",
            names[i - 1],
            f"MRN{1000 + i}",
            date(1950 + i, 1, 1),
            "female" if i % 2 else "male",
            "Ward 5B" if i <= 4 else "ED",
            str(i),
            "IMP" if i <= 4 else "EMER",
        )
        for i in range(1, 8)
    )


@contextmanager
def directory(fake: Any) -> Iterator[Any]:
    """Install a patient directory for the block (the seam the patient-context work fills)."""
    previous = patients.install(fake)
    try:
        yield fake
    finally:
        patients.install(previous)


def app_with_example_patients() -> Any:
    """ASGI factory for uvicorn: the service app with the example stream's patients behind the seam."""
    from service.app import app

    patients.install(example_directory())
    return app


def start_api_with_patients(stack: Any, **extra_env: str) -> str:
    """``stack.start_api`` with :func:`app_with_example_patients` (uvicorn ``--factory``) instead of the plain
    app: the API on loopback, with the example stream's patients behind the seam."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    paths = [str(ROOT / "tests" / "integration"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**stack.env, **extra_env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    uvicorn = str(ROOT / ".venv" / "bin" / "uvicorn")
    args = [
        uvicorn,
        "--factory",
        "review_support:app_with_example_patients",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    stack.api = stack._spawn([*args, "--log-level", "warning"], env, "api")
    stack.base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if stack.api.poll() is not None:
            raise RuntimeError(f"API exited with {stack.api.returncode}; logs in {stack.tmp}")
        with contextlib.suppress(httpx.HTTPError):
            if stack.http.get(f"{stack.base_url}/healthz", timeout=2).status_code == 200:
                return stack.base_url
        if time.monotonic() > deadline:
            raise RuntimeError(f"API did not answer /healthz; logs in {stack.tmp}")
        time.sleep(0.1)
