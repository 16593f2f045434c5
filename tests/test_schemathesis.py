"""Schemathesis against the app's own OpenAPI document: generated requests (valid and invalid bodies, query
strings and paths) for every operation, with credentials, must never get a server error. Runs in process
(embedded Redis, eager Celery) in the production profile; bounded by ``MAX_EXAMPLES`` per operation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from auth_helpers import TestIssuer, review_env, review_headers
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from config.settings import get_settings
from service.apidocs import openapi_document
from service.app import app
from service.security.jwks import clear_key_sets

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # starlette TestClient / httpx notices
MAX_EXAMPLES = 20
NDJSON = ("application/fhir+ndjson", "application/x-ndjson", "application/ndjson")


@schemathesis.serializer(*NDJSON)
def _ndjson(ctx: Any, value: Any) -> bytes:
    """$import bodies: the generated list of resources, one JSON document per line."""
    items = value if isinstance(value, list) else [value]
    return b"\n".join(json.dumps(item).encode() for item in items)


BASE = "http://testserver"
schema = schemathesis.openapi.from_dict(openapi_document(app))
_state: dict[str, Any] = {}


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    feed, ehr = TestIssuer(tmp, name="feed"), TestIssuer(tmp, name="ehr")
    env = {
        **review_env(tmp),
        **ehr.env(public_base_url=BASE),
        "EHR_ALERTS_FEED_ISSUERS": json.dumps({feed.issuer: str(feed.jwks_path)}),
        "EHR_ALERTS_CDS_FHIR_SERVERS_STRICT": "true",  # no generated fhirServer is ever contacted
        "EHR_ALERTS_METRICS_TOKEN": "metrics-token-0123456789",
        "EHR_ALERTS_PROFILE": "production",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("EHR_ALERTS_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        get_settings.cache_clear()
        clear_key_sets()
        _state.update(feed=feed, ehr=ehr)
        with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
            yield client
    get_settings.cache_clear()
    clear_key_sets()


def credentials(path: str) -> dict[str, str]:
    """The right kind of token for the route (a fresh CDS JWT per call: aud = the URL, jti once)."""
    if path.startswith(("/fhir", "/alerts", "/patients")):
        token = _state["feed"].token("ehr-alerts", sub="fuzz", scope="system/*.cud system/DetectedIssue.r")
        return {"Authorization": f"Bearer {token}"}
    if path.startswith("/cds-services"):
        return _state["ehr"].headers(f"{BASE}{path}")
    if path == "/metrics":
        return {"Authorization": "Bearer metrics-token-0123456789"}
    return review_headers("fuzz-admin", ["admin"])


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_server_errors(case: Any, http: TestClient) -> None:
    kwargs = case.as_transport_kwargs(base_url=BASE)
    kwargs["headers"] = {**(kwargs.get("headers") or {}), **credentials(case.formatted_path)}
    kwargs.pop("follow_redirects", None)
    kwargs.pop("allow_redirects", None)
    response = http.request(**{k: v for k, v in kwargs.items() if k in _REQUEST_ARGS})
    if _is_documented_not_ready(case.formatted_path, response.status_code, response.text):
        return
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"


def _is_documented_not_ready(path: str, status: int, text: str) -> bool:
    """``/readyz`` answers 503 by design when no worker heartbeat is fresh (no worker runs in this test)."""
    return path == "/readyz" and status == 503 and '"status":"not-ready"' in text


_REQUEST_ARGS = ("method", "url", "headers", "params", "json", "content", "data", "files", "cookies")
