"""The route inventory (service/security/inventory.py) and the access rule of every route, on the real app
in the production profile: no token, an untrusted issuer, a missing scope, a viewer acting, /metrics and
/docs. Runs in process (embedded Redis); the live stack has its own tests."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from auth_helpers import TestIssuer, review_env, review_headers
from fastapi.testclient import TestClient
from security_testapp import configure, settings_reset

from service.security.inventory import PUBLIC, ROUTES

SAMPLE = {
    "resource_type": "Observation",
    "resource_id": "obs-1",
    "patient_id": "p-1",
    "alert_id": "a-1",
    "service_id": "mg-k-patient-view",
    "action": "acknowledge",
    "item_id": "dp-1",
}
METRICS_TOKEN = "scrape-secret-0123456789"


def app_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path) of every route and mount (a mount counts as GET) of the app."""
    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                walk(included.routes, prefix + route.include_context.prefix)
                continue
            methods = getattr(route, "methods", None) or {"GET"}
            for method in methods - {"HEAD", "OPTIONS"}:
                found.add((method, prefix + route.path))

    walk(app.routes, "")
    return found


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE[m.group(1)], path)


@pytest.fixture
def env(tmp_path, monkeypatch):
    feed, cds, stranger = TestIssuer(tmp_path, name="feed"), TestIssuer(tmp_path, name="ehr"), TestIssuer(tmp_path)
    values = {
        **review_env(tmp_path),
        "EHR_ALERTS_FEED_ISSUERS": json.dumps({feed.issuer: str(feed.jwks_path)}),
        "EHR_ALERTS_CDS_ISSUERS": json.dumps({cds.issuer: str(cds.jwks_path)}),
        "EHR_ALERTS_METRICS_TOKEN": METRICS_TOKEN,
        "EHR_ALERTS_PROFILE": "production",
    }
    with settings_reset():
        configure(monkeypatch, values)
        yield {"feed": feed, "cds": cds, "stranger": stranger}


@pytest.fixture
def http(env):
    from service.app import app

    with TestClient(app, follow_redirects=False) as client:
        yield client


def feed_headers(issuer: TestIssuer, scope: str) -> dict[str, str]:
    token = issuer.token("ehr-alerts", sub="lab", client_id="lab-interface", scope=scope)
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}


def test_every_route_is_in_the_inventory():
    from service.app import app

    routes = app_routes(app)
    assert routes - set(ROUTES) == set(), "a new route needs its access rule in service/security/inventory.py"
    assert set(ROUTES) - routes == set(), "the inventory lists routes the app no longer has"


NON_PUBLIC = sorted(k for k, v in ROUTES.items() if v.rule != PUBLIC)


@pytest.mark.parametrize(("method", "path"), NON_PUBLIC)
def test_no_token_is_refused(http, method, path):
    response = http.request(method, concrete(path), content=b"{}", headers={"Content-Type": "application/json"})
    expected = ROUTES[(method, path)].anonymous
    assert response.status_code == expected, response.text
    if expected == 401:
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["resourceType"] == "OperationOutcome"
        assert response.json()["issue"][0]["code"] == "login"
    else:
        assert response.headers["location"].startswith("/review/login")


@pytest.mark.parametrize(("method", "path"), NON_PUBLIC)
def test_untrusted_issuer_is_refused(http, env, method, path):
    stranger: TestIssuer = env["stranger"]
    url = concrete(path)
    token = stranger.token(f"http://testserver{url}", sub="mallory", scope="system/*.cruds", roles=["admin"])
    response = http.request(method, url, content=b"{}", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == ROUTES[(method, path)].anonymous, response.text  # 401, or pages: to the login


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("POST", "/fhir/Observation", "system/Condition.c system/Observation.u"),
        ("PUT", "/fhir/Observation/obs-1", "system/Observation.c"),
        ("DELETE", "/fhir/Observation/obs-1", "system/Observation.cu"),
        ("POST", "/fhir", "system/DetectedIssue.r"),
        ("POST", "/fhir/$import", "system/DetectedIssue.r"),
        ("GET", "/alerts", "system/*.cud"),
        ("GET", "/patients/p-1/alerts", "system/Observation.rs"),
    ],
)
def test_wrong_scope_is_403(http, env, method, path, scope):
    response = http.request(method, path, content=b"{}", headers=feed_headers(env["feed"], scope))
    assert response.status_code == 403, response.text
    assert response.json()["issue"][0]["code"] == "forbidden"


def test_bundle_entry_without_its_scope_stores_nothing(http, env):
    from workers import inbox
    from workers.state.connection import get_redis

    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Condition", "id": "c1"},
                "request": {"method": "PUT", "url": "Condition/c1"},
            },
            {"request": {"method": "DELETE", "url": "Observation/o1"}},
        ],
    }
    before = inbox.size(get_redis())
    response = http.post("/fhir", json=bundle, headers=feed_headers(env["feed"], "system/Condition.u"))
    assert response.status_code == 403
    assert "Bundle.entry[1]: system/Observation.d" in response.json()["issue"][0]["diagnostics"]
    assert inbox.size(get_redis()) == before


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("POST", "/api/review/alerts/a-1/transitions", "viewer"),
        ("GET", "/api/review/audit?from=2020-01-01&to=2030-01-01", "pharmacist"),
        ("GET", "/api/review/analytics", "pharmacist"),
        ("GET", "/audit/AuditEvent", "pharmacist"),
    ],
)
def test_viewer_or_pharmacist_acting_beyond_their_role_is_403(http, method, path, role):
    response = http.request(
        method, path, json={"action": "acknowledge", "revision": 1}, headers=review_headers("v", [role])
    )
    assert response.status_code == 403, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


def test_alert_reads_accept_a_review_role_or_the_detectedissue_read_scope(http, env):
    assert http.get("/alerts", headers=review_headers("v", ["viewer"])).status_code == 200
    assert http.get("/alerts", headers=feed_headers(env["feed"], "system/DetectedIssue.rs")).status_code == 200
    assert http.get("/patients/p-1/alerts", headers=feed_headers(env["feed"], "system/*.read")).status_code == 200
    restricted = feed_headers(env["feed"], "system/DetectedIssue.rs?patient=p-1")  # restrictions grant nothing
    assert http.get("/alerts", headers=restricted).status_code == 403


def test_metrics_needs_the_scrape_token(http):
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.get("/metrics", headers=review_headers("root", ["admin"])).status_code == 401
    ok = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert ok.status_code == 200 and "ehr_alerts_auth_failures_total" in ok.text


def test_docs_need_a_signed_in_user_and_their_assets_are_local(http):
    assert http.get("/docs").status_code == 401
    assert http.get("/openapi.json").status_code == 401
    page = http.get("/docs", headers=review_headers("v", ["viewer"]))
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and all(a.startswith("/docs/assets/") for a in assets), assets  # no CDN
    for asset in assets:
        assert http.get(asset).status_code == 200
    http.cookies.set("ehr_alerts_session", review_headers("v", ["viewer"])["Authorization"].split()[1])
    assert http.get("/openapi.json").status_code == 200  # the page's own fetch, with the session cookie


def test_openapi_describes_the_bodies_routes_read_themselves(http):
    schema = http.get("/openapi.json", headers=review_headers("v", ["viewer"])).json()
    paths = schema["paths"]
    assert "application/fhir+json" in paths["/fhir"]["post"]["requestBody"]["content"]
    assert "application/fhir+ndjson" in paths["/fhir/$import"]["post"]["requestBody"]["content"]
    assert paths["/cds-services/{service_id}"]["post"]["requestBody"]["content"]["application/json"]
    assert paths["/cds-services/{service_id}/feedback"]["post"]["requestBody"]
    assert {"feedBearer", "alertReader", "metricsToken", "reviewBearer"} <= set(schema["components"]["securitySchemes"])


def test_docs_are_off_when_disabled(tmp_path, monkeypatch):
    with settings_reset():
        configure(monkeypatch, {"EHR_ALERTS_API_DOCS": "false", "EHR_ALERTS_PROFILE": "dev"})
        from service.app import app

        with TestClient(app) as client:
            assert client.get("/docs").status_code == 404
            assert client.get("/openapi.json").status_code == 404
