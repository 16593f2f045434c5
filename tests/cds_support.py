"""Builders for the CDS Hooks tests: clinical scenarios relative to the wall clock (a CDS call evaluates as of
now), prefetch built from the service's own templates, hook requests, the derived 2.0.1 JSON Schema."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from fhir_builders import (
    FUROSEMIDE,
    ago,
    bundle,
    condition,
    magnesium,
    med_request,
    med_statement,
    potassium,
    rxnorm,
)
from loopback_fhir import matches

from service.cds.services import PrefetchQuery, prefetch_queries, substitute
from workers.pipeline import get_catalog

SCHEMA = Path(__file__).resolve().parent / "data" / "cds-hooks-spec" / "cds-hooks-2.0.1.derived.schema.json"
HYPOK = "hypokalemia-without-magnesium"
REFRACTORY = "refractory-hypokalemia-on-diuretic"
ARRHYTHMIA = "arrhythmia-with-low-magnesium"
RULES = (HYPOK, REFRACTORY, ARRHYTHMIA)
HOOKS = ("patient-view", "order-select", "order-sign")
SERVICE = {hook: f"mg-k-{hook}" for hook in HOOKS}
EXPECTED = {HYPOK: "info", REFRACTORY: "warning", ARRHYTHMIA: "critical"}
TOKEN = "fhir-access-token-do-not-log"
KCL = rxnorm("8591", "potassium chloride")
MGSO4 = rxnorm("6585", "magnesium sulfate")


def now() -> datetime:
    """The wall clock (CDS calls are evaluated as of the moment they arrive)."""
    return datetime.now(UTC)


def h(hours: float) -> str:
    """FHIR dateTime ``hours`` ago."""
    return ago(hours, now=now())


def scenario(rule: str | None, patient: str) -> list[dict[str, Any]]:
    """Resources of a patient for whom exactly ``rule`` fires (None: nothing fires)."""
    p = {"patient": patient}
    if rule == HYPOK:
        return [potassium(3.1, at=h(4), **p), med_statement(rxnorm("197361", "amlodipine"), start="2024-01-01", **p)]
    if rule == REFRACTORY:
        return [
            med_statement(FUROSEMIDE, start=h(24 * 30)[:10], **p),
            potassium(3.2, at=h(40), **p),
            potassium(3.3, at=h(4), **p),
            magnesium(0.60, at=h(10), **p),  # low, no Mg therapy since: Mg can still explain it
        ]
    if rule == ARRHYTHMIA:  # a recent AF diagnosis with Mg below 0.5 mmol/L (a critical card)
        return [magnesium(0.45, at=h(5), **p), potassium(4.1, at=h(5), **p), condition(onset=h(24), **p)]
    return [potassium(4.2, at=h(6), **p), magnesium(0.85, at=h(6), **p)]


@cache
def queries() -> tuple[PrefetchQuery, ...]:
    """The prefetch keys the services advertise."""
    return prefetch_queries([r for r in get_catalog().rules if r.status == "active"])


def searchset(resources: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A searchset Bundle."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": r} for r in resources],
        **extra,
    }


def prefetch_for(
    resources: list[dict[str, Any]], patient: str, keys: list[str] | None = None
) -> dict[str, dict[str, Any] | None]:
    """The prefetch an EHR would send: each advertised template run over ``resources`` (all keys by default)."""
    tokens = {"context.patientId": patient}
    out = {}
    for query in queries():
        if keys is not None and query.key not in keys:
            continue
        if query.read:  # Patient/{{context.patientId}}: the resource itself, or null when the EHR has none
            found = [r for r in resources if r.get("resourceType") == query.resource_type and r.get("id") == patient]
            out[query.key] = found[0] if found else None
            continue
        params = [(name, substitute(value, tokens)) for name, value in query.params]
        out[query.key] = searchset([r for r in resources if matches(r, query.resource_type, params)])
    return out


def draft_orders(*resources: dict[str, Any]) -> dict[str, Any]:
    """A draftOrders Bundle."""
    return bundle(*resources)


def draft_kcl(patient: str, id: str = "draft-kcl") -> dict[str, Any]:
    """A draft potassium chloride order."""
    return med_request(KCL, status="draft", authored=None, patient=patient, id=id)


def hook_request(
    hook: str,
    patient: str,
    prefetch: dict[str, Any] | None = None,
    *,
    fhir_server: str | None = None,
    token: str | None = TOKEN,
    orders: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A CDS Hooks call body; order hooks get ``orders`` (default: a draft KCl) as draftOrders."""
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": patient}
    if hook != "patient-view":
        drafts = orders if orders is not None else [draft_kcl(patient)]
        context["draftOrders"] = draft_orders(*drafts)
        if hook == "order-select":
            context["selections"] = [f"{drafts[0]['resourceType']}/{drafts[0]['id']}"]
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if fhir_server:
        body["fhirServer"] = fhir_server
        if token:
            body["fhirAuthorization"] = {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/*.read",
                "subject": "ehr-alerts",
            }
    if prefetch is not None:
        body["prefetch"] = prefetch
    body.update(extra)
    return body


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema derived from the CDS Hooks 2.0.1 text."""
    return json.loads(SCHEMA.read_text())


def validate(instance: Any, definition: str) -> None:
    """Validate against one definition of the derived schema (e.g. ServiceResponse, DiscoveryResponse)."""
    root = schema()
    defs = root.get("$defs") or root.get("definitions") or {}
    assert definition in defs, sorted(defs)
    ref = "#/$defs/" if "$defs" in root else "#/definitions/"
    jsonschema.validate(instance, {**root, "$ref": ref + definition})


def empty_members(value: Any, path: str = "$") -> list[str]:
    """Paths of null / empty members (CDS Hooks: none allowed except ``cards`` / ``services``)."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            if v in (None, "", [], {}) and k not in ("cards", "services"):
                found.append(f"{path}.{k}")
            found += empty_members(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if v in (None, "", [], {}):
                found.append(f"{path}[{i}]")
            found += empty_members(v, f"{path}[{i}]")
    return found


# --- The captured CDS Hooks sandbox session (tests/data/shared/cds-hooks-sandbox) -------------------------

SANDBOX_DIR = Path(__file__).resolve().parent / "data" / "shared" / "cds-hooks-sandbox"
EXAMPLE_STREAM = Path(__file__).resolve().parents[1] / "examples" / "stream" / "events.ndjson"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$")


def sandbox_files() -> list[Path]:
    """Every captured request, in the order the session sent them (a-01, b-01, b-02, ...)."""
    return sorted(SANDBOX_DIR.glob("sandbox-*.json"))


def sandbox(name: str) -> dict[str, Any]:
    """One captured request: url_path, jwt_header, jwt_claims_keys, status_then, body."""
    return json.loads((SANDBOX_DIR / name).read_text())


def captured_at() -> datetime:
    """When the session ran: its first feedback's outcomeTimestamp (the calls carry no time of their own)."""
    stamps = [
        item["outcomeTimestamp"]
        for path in sandbox_files()
        for item in json.loads(path.read_text())["body"].get("feedback", [])
    ]
    return datetime.fromisoformat(min(stamps).replace("Z", "+00:00")).replace(second=0, microsecond=0)


def shift_times(value: Any, delta: timedelta) -> Any:
    """A copy of a JSON value with every FHIR dateTime moved by ``delta`` and every date by its whole days
    (what the demo shift of ``ehr-alerts replay`` does to an extract, here applied to captured requests)."""
    if isinstance(value, dict):
        return {k: shift_times(v, delta) for k, v in value.items()}
    if isinstance(value, list):
        return [shift_times(v, delta) for v in value]
    if isinstance(value, str) and _DATE_TIME.match(value):
        moved = datetime.fromisoformat(value.replace("Z", "+00:00")) + delta
        text = moved.isoformat(timespec="milliseconds" if "." in value else "seconds")
        return text.replace("+00:00", "Z") if value.endswith("Z") else text
    if isinstance(value, str) and _DATE.match(value):
        return (date.fromisoformat(value) + timedelta(days=delta.days)).isoformat()
    return value


def example_stream() -> list[dict[str, Any]]:
    """The committed example stream (March 2024)."""
    return [json.loads(line) for line in EXAMPLE_STREAM.read_text().splitlines() if line.strip()]


def capture_shift() -> timedelta:
    """How far the session moved the example stream (March 2024 -> December 2026): the same resource's time
    in the stream and in a captured prefetch."""
    stream = {r["id"]: r for r in example_stream()}
    captured = sandbox("sandbox-b-01-patient-view.json")["body"]["prefetch"]["potassium"]["entry"][0]["resource"]
    then = datetime.fromisoformat(stream[captured["id"]]["effectiveDateTime"].replace("Z", "+00:00"))
    return datetime.fromisoformat(captured["effectiveDateTime"].replace("Z", "+00:00")) - then


# --- the app in process --------------------------------------------------------------------------------------


@contextmanager
def signed_client(directory: Path, **env: str) -> Iterator[Any]:
    """A TestClient of the app in process, trusting a test issuer (keys in ``directory``) with the settings
    ``env`` on top; every request carries a fresh client JWT for its exact URL."""
    import httpx
    import pytest
    from auth_helpers import TestIssuer
    from fastapi.testclient import TestClient

    from config.settings import get_settings
    from service.app import app

    issuer = TestIssuer(directory)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**issuer.env(), **env}.items():
            mp.setenv(name, value)
        get_settings.cache_clear()

        def sign(request: httpx.Request) -> None:
            request.headers["Authorization"] = f"Bearer {issuer.token(str(request.url.copy_with(query=None)))}"

        with TestClient(app, raise_server_exceptions=False) as c:
            c.event_hooks = {"request": [sign], "response": []}
            yield c
    get_settings.cache_clear()


# --- an API subprocess ---------------------------------------------------------------------------------------


@contextmanager
def api_process(env: dict[str, str], log: Path) -> Iterator[str]:
    """``uvicorn service.app:app`` on a free loopback port with ``env`` over this process's environment; yields
    its base URL once ``/healthz`` answers and stops it afterwards."""
    import contextlib
    import os
    import signal
    import socket
    import subprocess
    import time

    import httpx

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "wb") as out:
        api = subprocess.Popen(
            [str(root / ".venv/bin/uvicorn"), "service.app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=root,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert api.poll() is None, log.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "API did not start"
                time.sleep(0.1)
            yield base
        finally:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(10)
