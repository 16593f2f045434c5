"""Review API access control: roles matrix (401 / 403 / 200) with header and cookie, the dotted roles claim,
the dev issuer, `token mint` and its refusal outside the dev profile."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import jwt
import pytest
from auth_helpers import REVIEW_AUDIENCE, REVIEW_ISSUER, review_env, review_headers, review_token, unsigned_token
from fastapi.testclient import TestClient
from security_testapp import configure, make_app, settings_reset

from service.security import SESSION_COOKIE, failure_counts, require_role
from service.security.dev import DEV_ISSUER, DevProfileRequired, mint_token

ENDPOINTS = {  # endpoint -> role it requires
    ("GET", "/review/alerts"): "viewer",
    ("POST", "/review/alerts/a1/acknowledge"): "pharmacist",
    ("GET", "/review/analytics"): "admin",
}
GRANTS = {  # token roles -> what they may do
    "viewer": {"viewer"},
    "pharmacist": {"viewer", "pharmacist"},
    "admin": {"viewer", "pharmacist", "admin"},
}


@pytest.fixture
def client(tmp_path, monkeypatch):
    with settings_reset():
        configure(monkeypatch, review_env(tmp_path))
        with TestClient(make_app()) as http:
            yield http


@pytest.mark.parametrize(("method", "path"), list(ENDPOINTS))
def test_no_token_is_401(client, method, path):
    response = client.request(method, path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("granted", list(GRANTS))
@pytest.mark.parametrize(("method", "path"), list(ENDPOINTS))
def test_roles_matrix_with_header(client, method, path, granted):
    response = client.request(method, path, headers=review_headers("alice", [granted], name="Alice A."))
    if ENDPOINTS[(method, path)] in GRANTS[granted]:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["subject"] == "alice" and body["actor"] == "user:alice" and body["name"] == "Alice A."
        assert set(body["roles"]) == GRANTS[granted]
    else:
        assert response.status_code == 403


@pytest.mark.parametrize("granted", list(GRANTS))
def test_roles_matrix_with_cookie(client, granted):
    client.cookies.set(SESSION_COOKIE, review_token("bob", [granted]))
    for (method, path), needed in ENDPOINTS.items():
        response = client.request(method, path)
        assert response.status_code == (200 if needed in GRANTS[granted] else 403), (path, granted)
    client.cookies.clear()


def test_token_without_known_roles_is_403(client):
    before = failure_counts().get(("review", "role"), 0)
    assert client.get("/review/alerts", headers=review_headers("carol", ["nurse"])).status_code == 403
    assert client.get("/review/alerts", headers=review_headers("carol", None)).status_code == 403
    assert failure_counts()[("review", "role")] == before + 2


def test_bad_header_does_not_fall_back_to_cookie(client):
    client.cookies.set(SESSION_COOKIE, review_token("bob", ["admin"]))
    assert client.get("/review/alerts", headers={"Authorization": "Bearer junk"}).status_code == 401
    client.cookies.clear()


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: review_token("a", ["admin"], exp=int(time.time()) - 120), id="expired"),
        pytest.param(lambda: review_token("a", ["admin"], aud="account"), id="wrong-audience"),
        pytest.param(lambda: review_token("a", ["admin"], iss="https://evil.test"), id="wrong-issuer"),
        pytest.param(lambda: review_token(None, ["admin"]), id="no-subject"),
        pytest.param(lambda: review_token("a", ["admin"], exp=None), id="no-exp"),
        pytest.param(
            lambda: unsigned_token({"iss": REVIEW_ISSUER, "aud": REVIEW_AUDIENCE, "sub": "a", "roles": ["admin"]}),
            id="alg-none",
        ),
        pytest.param(
            lambda: jwt.encode(
                {"iss": REVIEW_ISSUER, "aud": REVIEW_AUDIENCE, "sub": "a", "roles": ["admin"], "exp": 2**31},
                "secret-secret-secret-secret-secret!",
                algorithm="HS256",
                headers={"kid": "review-test-rs256"},
            ),
            id="hs256",
        ),
    ],
)
def test_invalid_review_tokens_are_401(client, token):
    for use_cookie in (False, True):
        if use_cookie:
            client.cookies.set(SESSION_COOKIE, token())
            response = client.get("/review/alerts")
            client.cookies.clear()
        else:
            response = client.get("/review/alerts", headers={"Authorization": f"Bearer {token()}"})
        assert response.status_code == 401, use_cookie


def test_cookie_write_from_another_origin_is_403(client):
    client.cookies.set(SESSION_COOKIE, review_token("bob", ["pharmacist"]))
    path = "/review/alerts/a1/acknowledge"
    assert client.post(path, headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.post(path, headers={"Origin": "http://testserver"}).status_code == 200
    assert client.post(path).status_code == 200  # no Origin: not a cross-site browser request
    client.cookies.clear()


def test_dotted_roles_claim_for_keycloak(tmp_path, monkeypatch):
    env = {**review_env(tmp_path), "EHR_ALERTS_REVIEW_ROLES_CLAIM": "realm_access.roles"}
    with settings_reset():
        configure(monkeypatch, env)
        with TestClient(make_app()) as http:
            nested = review_token("kc", None, realm_access={"roles": ["pharmacist", "offline_access"]})
            response = http.post("/review/alerts/a1/acknowledge", headers={"Authorization": f"Bearer {nested}"})
            assert response.status_code == 200
            assert set(response.json()["roles"]) == {"pharmacist", "viewer"}
            top_level_only = review_headers("kc", ["admin"])  # roles in the wrong place give no role
            assert http.get("/review/alerts", headers=top_level_only).status_code == 403


def test_unknown_role_in_require_role_is_a_programming_error():
    with pytest.raises(ValueError, match="nurse"):
        require_role("nurse")


# --- dev profile ---------------------------------------------------------------------------------------------


def _dev_env(tmp_path):
    return {"EHR_ALERTS_PROFILE": "dev", "EHR_ALERTS_DEV_KEY_FILE": str(tmp_path / "keys" / "dev.pem")}


def test_dev_tokens_accepted_in_dev_profile(tmp_path, monkeypatch):
    with settings_reset():
        configure(monkeypatch, _dev_env(tmp_path))
        token = mint_token("dana", ["pharmacist"], minutes=5, name="Dana")
        key_file = tmp_path / "keys" / "dev.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["iss"] == DEV_ISSUER and claims["exp"] - claims["iat"] == 300
        with TestClient(make_app()) as http:
            ok = http.post("/review/alerts/a1/acknowledge", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and ok.json()["name"] == "Dana"
            denied = http.get("/review/analytics", headers={"Authorization": f"Bearer {token}"})
            assert denied.status_code == 403
        pem = key_file.read_bytes()
        assert mint_token("dana", ["viewer"]) != token
        assert key_file.read_bytes() == pem  # the key file is reused, not regenerated


def test_dev_tokens_refused_in_production(tmp_path, monkeypatch):
    with settings_reset():
        configure(monkeypatch, _dev_env(tmp_path))
        token = mint_token("dana", ["admin"])
        configure(monkeypatch, {**review_env(tmp_path), "EHR_ALERTS_DEV_KEY_FILE": str(tmp_path / "keys" / "dev.pem")})
        with TestClient(make_app()) as http:
            assert http.get("/review/alerts", headers={"Authorization": f"Bearer {token}"}).status_code == 401
        with pytest.raises(DevProfileRequired):
            mint_token("dana", ["admin"])


def test_dev_key_readable_by_others_is_refused(tmp_path, monkeypatch):
    with settings_reset():
        configure(monkeypatch, _dev_env(tmp_path))
        mint_token("e", ["viewer"])
        os.chmod(tmp_path / "keys" / "dev.pem", 0o644)
        with pytest.raises(PermissionError, match="chmod 600"):
            mint_token("e", ["viewer"])


def test_mint_refuses_unknown_roles(tmp_path, monkeypatch):
    with settings_reset():
        configure(monkeypatch, _dev_env(tmp_path))
        with pytest.raises(ValueError, match="roles"):
            mint_token("e", ["root"])


def _cli(args, env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EHR_ALERTS_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_mint_in_dev_profile(tmp_path):
    result = _cli(["token", "mint", "--sub", "alice", "--role", "pharmacist", "--minutes", "5"], _dev_env(tmp_path))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["sub"], claims["roles"], claims["aud"]) == ("alice", ["pharmacist"], "ehr-alerts")


def test_cli_mint_refused_outside_dev_profile(tmp_path):
    env = {"EHR_ALERTS_DEV_KEY_FILE": str(tmp_path / "dev.pem")}
    result = _cli(["token", "mint", "--sub", "alice", "--role", "admin"], env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "EHR_ALERTS_PROFILE=dev" in result.stderr
    assert not (tmp_path / "dev.pem").exists()
