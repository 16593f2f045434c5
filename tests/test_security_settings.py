"""Security settings: invalid values fail at start naming the setting; the sandbox issuer is dev-only;
CORS allow-list (§17 item 50); startup warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from auth_helpers import TestIssuer
from fastapi.testclient import TestClient
from security_testapp import configure, make_app, settings_reset

from config.settings import SANDBOX_ISSUER, SANDBOX_KID, SettingsError, load_settings
from service.security import security_startup_warnings, trusted_issuers
from service.security.cds import sandbox_jwks_path


@pytest.fixture(autouse=True)
def _reset():
    with settings_reset():
        yield


def _refused(monkeypatch, env, setting, match):
    configure(monkeypatch, env)
    with pytest.raises(SettingsError, match=setting) as info:
        load_settings()
    assert match in str(info.value), str(info.value)


def test_issuer_with_missing_jwks_file_fails_naming_the_setting(monkeypatch, tmp_path):
    missing = tmp_path / "nope.json"
    env = {"EHR_ALERTS_CDS_ISSUERS": json.dumps({"https://ehr.test": str(missing)})}
    _refused(monkeypatch, env, "EHR_ALERTS_CDS_ISSUERS", "cannot read file")


def test_issuers_not_json_fails(monkeypatch):
    _refused(monkeypatch, {"EHR_ALERTS_CDS_ISSUERS": "{https://ehr.test: x}"}, "EHR_ALERTS_CDS_ISSUERS", "JSON")


def test_jwks_file_that_is_not_a_jwks_fails(monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": []}')
    env = {"EHR_ALERTS_CDS_ISSUERS": json.dumps({"https://ehr.test": str(bad)})}
    _refused(monkeypatch, env, "EHR_ALERTS_CDS_ISSUERS", "not a JWKS")


def test_plain_http_jwks_url_fails(monkeypatch):
    env = {"EHR_ALERTS_CDS_ISSUERS": json.dumps({"https://ehr.test": "http://ehr.test/jwks.json"})}
    _refused(monkeypatch, env, "EHR_ALERTS_CDS_ISSUERS", "must be https")


def test_https_jwks_url_accepted_without_network(monkeypatch):
    configure(monkeypatch, {"EHR_ALERTS_CDS_ISSUERS": json.dumps({"https://ehr.test": "https://ehr.test/jwks"})})
    assert load_settings().cds_issuers == {"https://ehr.test": "https://ehr.test/jwks"}


def test_sandbox_issuer_refused_in_production(monkeypatch):
    env = {"EHR_ALERTS_CDS_ISSUERS": json.dumps({SANDBOX_ISSUER: sandbox_jwks_path()})}
    _refused(monkeypatch, env, "EHR_ALERTS_CDS_ISSUERS", "dev profile only")


def test_sandbox_key_under_another_issuer_refused_in_production(monkeypatch):
    env = {"EHR_ALERTS_CDS_ISSUERS": json.dumps({"https://looks-legit.test": sandbox_jwks_path()})}
    _refused(monkeypatch, env, "EHR_ALERTS_CDS_ISSUERS", SANDBOX_KID)


def test_sandbox_trusted_in_dev_profile_only(monkeypatch):
    configure(monkeypatch, {"EHR_ALERTS_PROFILE": "dev"})
    dev = load_settings()
    assert trusted_issuers(dev) == {SANDBOX_ISSUER: sandbox_jwks_path()}
    assert json.loads(Path(sandbox_jwks_path()).read_text())["keys"][0]["kid"] == SANDBOX_KID
    assert any("dev profile" in w for w in security_startup_warnings(dev))
    configure(monkeypatch, {})
    assert trusted_issuers(load_settings()) == {}


def test_unknown_profile_fails(monkeypatch):
    _refused(monkeypatch, {"EHR_ALERTS_PROFILE": "staging"}, "EHR_ALERTS_PROFILE", "production")


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"EHR_ALERTS_PUBLIC_BASE_URL": "cds.example.org"}, "EHR_ALERTS_PUBLIC_BASE_URL"),
        ({"EHR_ALERTS_PUBLIC_BASE_URL": "https://cds.example.org/?a=1"}, "EHR_ALERTS_PUBLIC_BASE_URL"),
        ({"EHR_ALERTS_JWT_LEEWAY_SECONDS": "-1"}, "EHR_ALERTS_JWT_LEEWAY_SECONDS"),
        ({"EHR_ALERTS_JWT_LEEWAY_SECONDS": "3600"}, "EHR_ALERTS_JWT_LEEWAY_SECONDS"),
        ({"EHR_ALERTS_CORS_ORIGINS": "https://ehr.example.org/"}, "EHR_ALERTS_CORS_ORIGINS"),
        ({"EHR_ALERTS_CORS_ORIGINS": "*"}, "EHR_ALERTS_CORS_ORIGINS"),
        ({"EHR_ALERTS_REVIEW_ISSUER": "https://idp.test"}, "EHR_ALERTS_REVIEW_JWKS"),
        ({"EHR_ALERTS_REVIEW_JWKS": "https://idp.test/certs"}, "EHR_ALERTS_REVIEW_JWKS"),
        ({"EHR_ALERTS_REVIEW_ROLES_CLAIM": "realm_access..roles"}, "EHR_ALERTS_REVIEW_ROLES_CLAIM"),
        ({"EHR_ALERTS_CDS_AUTH_ENABLED": "maybe"}, "EHR_ALERTS_CDS_AUTH_ENABLED"),
        ({"EHR_ALERTS_JWKS_CA_FILE": "/nonexistent/ca.pem"}, "EHR_ALERTS_JWKS_CA_FILE"),
    ],
)
def test_invalid_values_name_the_setting(monkeypatch, env, setting):
    _refused(monkeypatch, env, setting, setting)


def test_tenants_for_unknown_issuer_fail(monkeypatch):
    env = {"EHR_ALERTS_CDS_TENANTS": json.dumps({"https://nobody.test": ["t1"]})}
    _refused(monkeypatch, env, "EHR_ALERTS_CDS_TENANTS", "not in EHR_ALERTS_CDS_ISSUERS")


def test_values_parsed(monkeypatch, tmp_path):
    ehr = TestIssuer(tmp_path)
    env = {
        **ehr.env(public_base_url="https://cds.example.org/"),
        "EHR_ALERTS_CORS_ORIGINS": "https://ehr.example.org, http://localhost:8080",
        "EHR_ALERTS_REVIEW_ROLES_CLAIM": "realm_access.roles",
    }
    configure(monkeypatch, env)
    settings = load_settings()
    assert settings.public_base_url == "https://cds.example.org"
    assert settings.cors_origins == ["https://ehr.example.org", "http://localhost:8080"]
    assert settings.cds_issuers == {ehr.issuer: str(ehr.jwks_path)}
    configure(monkeypatch, {"EHR_ALERTS_CORS_ORIGINS": '["https://a.example"]'})
    assert load_settings().cors_origins == ["https://a.example"]


def test_cors_allow_list(monkeypatch):
    configure(monkeypatch, {"EHR_ALERTS_CORS_ORIGINS": "https://ehr.example.org"})
    with TestClient(make_app()) as http:
        preflight = {
            "Origin": "https://ehr.example.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        ok = http.options("/cds-services/x", headers=preflight)
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://ehr.example.org"
        assert "POST" in ok.headers["access-control-allow-methods"]
        allowed = ok.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
        assert "access-control-allow-credentials" not in ok.headers
        evil = http.options("/cds-services/x", headers={**preflight, "Origin": "https://evil.example"})
        assert evil.status_code == 400
        assert "access-control-allow-origin" not in evil.headers
        # simple request: the 401 from an allowed origin still carries ACAO (the browser can read the status)
        response = http.get("/cds-services", headers={"Origin": "https://ehr.example.org"})
        assert response.status_code == 401
        assert response.headers["access-control-allow-origin"] == "https://ehr.example.org"


def test_no_cors_by_default(monkeypatch):
    configure(monkeypatch, {})
    with TestClient(make_app()) as http:
        response = http.options(
            "/cds-services", headers={"Origin": "https://ehr.example.org", "Access-Control-Request-Method": "GET"}
        )
        assert "access-control-allow-origin" not in response.headers


def test_any_origin_in_dev_profile(monkeypatch):
    configure(monkeypatch, {"EHR_ALERTS_PROFILE": "dev", "EHR_ALERTS_CORS_ORIGINS": "*"})
    assert any("any origin" in w for w in security_startup_warnings(load_settings()))
    with TestClient(make_app()) as http:
        response = http.options(
            "/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "GET"}
        )
        assert response.headers["access-control-allow-origin"] == "*"


def _import_app(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EHR_ALERTS_") and k != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-c", "import service.app"], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def test_app_says_loudly_at_start_that_auth_is_off():
    result = _import_app({"EHR_ALERTS_CDS_AUTH_ENABLED": "false"})
    assert result.returncode == 0, result.stderr
    assert "SECURITY: CDS HOOKS AUTHENTICATION IS OFF" in result.stderr


def test_app_refuses_to_start_with_a_missing_jwks_file(tmp_path):
    env = {"EHR_ALERTS_CDS_ISSUERS": json.dumps({"https://ehr.test": str(tmp_path / "missing.json")})}
    result = _import_app(env)
    assert result.returncode != 0
    assert "EHR_ALERTS_CDS_ISSUERS" in result.stderr and "cannot read file" in result.stderr


def test_openapi_declares_both_security_schemes(monkeypatch):
    configure(monkeypatch, {})
    schema = make_app().openapi()
    assert set(schema["components"]["securitySchemes"]) >= {"cdsHooksClientJwt", "reviewBearer", "reviewSession"}
    assert schema["paths"]["/cds-services"]["get"]["security"] == [{"cdsHooksClientJwt": []}]
    review = schema["paths"]["/review/alerts"]["get"]["security"]
    assert {"reviewBearer": []} in review and {"reviewSession": []} in review


def test_dev_profile_allows_the_cds_hooks_sandbox_origin_by_default(monkeypatch):
    configure(monkeypatch, {"EHR_ALERTS_PROFILE": "dev"})
    preflight = {
        "Origin": "https://sandbox.cds-hooks.org",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with TestClient(make_app()) as http:
        ok = http.options("/cds-services/mg-k-patient-view", headers=preflight)
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://sandbox.cds-hooks.org"
        other = http.options("/cds-services/mg-k-patient-view", headers={**preflight, "Origin": "https://x.example"})
        assert "access-control-allow-origin" not in other.headers
    configure(monkeypatch, {})  # production: nothing unless listed
    with TestClient(make_app()) as http:
        assert "access-control-allow-origin" not in http.options("/cds-services", headers=preflight).headers


def test_startup_warns_about_missing_feed_issuers_and_metrics_token(monkeypatch):
    configure(monkeypatch, {})
    warnings = security_startup_warnings(load_settings())
    assert any("EHR_ALERTS_FEED_ISSUERS" in w for w in warnings)
    assert any("EHR_ALERTS_METRICS_TOKEN" in w for w in warnings)
