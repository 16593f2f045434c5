"""Issue 15: ``EHR_ALERTS_API_ROUTES`` splits the API into separate deployments of the same image: ``cds`` serves
CDS Hooks, the pharmacist review and the alert read API without ingestion; ``ingest`` serves only ``/fhir``;
``all`` (default) both. Each shape keeps health, metrics and docs. Checked in a fresh interpreter per shape (the
app reads the setting when it is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_LIST = """
import json
from service.app import app
found = set()
def walk(routes, prefix):
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            walk(included.routes, prefix + route.include_context.prefix)
        else:
            found.add(prefix + route.path)
walk(app.routes, "")
print(json.dumps(sorted(found)))
"""
COMMON = {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}


def _paths(shape: str | None) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EHR_ALERTS_") and k != "REDIS_URL"}
    if shape is not None:
        env["EHR_ALERTS_API_ROUTES"] = shape
    out = subprocess.run([sys.executable, "-c", _LIST], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def shapes() -> dict[str, set[str]]:
    return {shape: _paths(shape) for shape in ("all", "cds", "ingest")} | {"default": _paths(None)}


def test_default_serves_everything(shapes: dict[str, set[str]]) -> None:
    assert shapes["default"] == shapes["all"]
    assert shapes["all"] == shapes["cds"] | shapes["ingest"]


def test_cds_shape_has_no_ingestion(shapes: dict[str, set[str]]) -> None:
    cds = shapes["cds"]
    assert cds >= COMMON
    assert {"/cds-services", "/cds-services/{service_id}", "/alerts", "/review"} <= cds
    assert not any(p.startswith("/fhir") for p in cds)


def test_ingest_shape_serves_only_ingestion(shapes: dict[str, set[str]]) -> None:
    ingest = shapes["ingest"]
    assert ingest >= COMMON
    assert {"/fhir", "/fhir/$import", "/fhir/{resource_type}/{resource_id}"} <= ingest
    assert not any(p.startswith(("/cds-services", "/review", "/api/review", "/alerts", "/patients")) for p in ingest)


def test_an_unknown_shape_is_refused() -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _paths("both")
    assert "EHR_ALERTS_API_ROUTES" in failed.value.stderr
