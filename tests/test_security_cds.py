"""CDS Hooks client authentication: the JWT negative matrix (§17 items 40-49) against a small app that uses
the real ``cds_client`` dependency, embedded Redis for the jti replay store."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path

import jwt
import pytest
from auth_helpers import TestIssuer, unsigned_token
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from security_testapp import configure, make_app, settings_reset

from config.settings import load_settings
from service.security import failure_counts, security_startup_warnings
from service.security.cds import _replay_key
from workers.state.connection import get_redis

BASE = "http://testserver"
DISCOVERY = f"{BASE}/cds-services"
SERVICE = f"{BASE}/cds-services/mg-k-patient-view"
FEEDBACK = f"{SERVICE}/feedback"
SPEC = Path(__file__).parent / "data" / "cds-hooks-spec"


@pytest.fixture
def issuer(tmp_path, monkeypatch):
    ehr = TestIssuer(tmp_path)
    with settings_reset():
        configure(monkeypatch, ehr.env())
        yield ehr


@pytest.fixture
def client(issuer):
    with TestClient(make_app()) as http:
        yield http


def refused(response, reason: str, before: dict) -> None:
    """A bare 401 whose recorded reason is ``reason``."""
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": "Unauthorized"}  # says nothing about which check failed
    after = failure_counts()
    assert after.get(("cds", reason), 0) == before.get(("cds", reason), 0) + 1, (reason, after)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(secret: bytes, claims: dict, kid: str) -> str:
    """An HS256 JWT built by hand (PyJWT refuses to use a PEM public key as an HMAC secret)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


def claims_for(issuer: TestIssuer, aud: str, **extra) -> dict:
    now = int(time.time())
    return {"iss": issuer.issuer, "aud": aud, "iat": now, "exp": now + 300, "jti": f"j-{time.time_ns()}", **extra}


# --- accepted -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_valid_token_accepted_on_every_endpoint(client, issuer, alg):
    for method, url in (("get", DISCOVERY), ("post", SERVICE), ("post", FEEDBACK)):
        response = client.request(method, url, headers=issuer.headers(url, alg=alg))
        assert response.status_code == 200, (url, response.text)
        assert response.json()["issuer"] == issuer.issuer
        assert response.json()["actor"] == f"ehr:{issuer.issuer}"


def test_extra_claims_tolerated_and_exposed(client, issuer):
    now = int(time.time())
    headers = issuer.headers(SERVICE, sub="epic-client-7", nbf=now - 300, tenant="hospital-a", foo={"bar": 1})
    response = client.post(SERVICE, headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert (body["subject"], body["tenant"]) == ("epic-client-7", "hospital-a")
    assert body["actor"] == f"ehr:{issuer.issuer}#epic-client-7"


def test_aud_as_single_element_array_accepted(client, issuer):
    assert client.post(SERVICE, headers=issuer.headers([SERVICE])).status_code == 200


def test_small_clock_skew_within_leeway_accepted(client, issuer):
    now = int(time.time())
    assert client.post(SERVICE, headers=issuer.headers(SERVICE, iat=now + 10, exp=now + 300)).status_code == 200
    assert client.post(SERVICE, headers=issuer.headers(SERVICE, iat=now - 300, exp=now - 10)).status_code == 200


# --- refused ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [DISCOVERY, SERVICE, FEEDBACK])
def test_missing_authorization_refused(client, url):
    before = failure_counts()
    response = client.request("GET" if url == DISCOVERY else "POST", url)
    refused(response, "missing", before)


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer not-a-jwt", "Bearer a.b.c"])
def test_unusable_authorization_refused(client, value):
    before = failure_counts()
    response = client.post(SERVICE, headers={"Authorization": value})
    refused(response, "malformed", before)


def test_alg_none_refused(client, issuer):
    before = failure_counts()
    token = unsigned_token(claims_for(issuer, SERVICE), {"kid": issuer.kid(), "typ": "JWT"})
    refused(client.post(SERVICE, headers={"Authorization": f"Bearer {token}"}), "algorithm", before)


def test_hs256_with_shared_secret_refused(client, issuer):
    before = failure_counts()
    token = issuer.token(SERVICE, alg="HS256", key="a-shared-secret-of-32-bytes-at-least!")
    refused(client.post(SERVICE, headers={"Authorization": f"Bearer {token}"}), "algorithm", before)


def test_hs256_with_public_key_as_secret_refused(client, issuer):
    """The classic key-confusion attack: HMAC keyed with the issuer's published public key."""
    before = failure_counts()
    public = issuer.keys["RS384"][1].public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    token = hs256_token(pem, claims_for(issuer, SERVICE), issuer.kid("RS384"))
    refused(client.post(SERVICE, headers={"Authorization": f"Bearer {token}"}), "algorithm", before)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS384"])
def test_other_asymmetric_algorithms_refused(client, issuer, tmp_path, alg):
    before = failure_counts()
    other = TestIssuer(tmp_path, algs=[alg])
    token = other.token(SERVICE, iss=issuer.issuer, headers={"kid": issuer.kid("RS384")})
    refused(client.post(SERVICE, headers={"Authorization": f"Bearer {token}"}), "algorithm", before)


def test_alg_not_matching_key_type_refused(client, issuer):
    """An RS384 header pointing at the EC key's kid (signed with the RSA key)."""
    before = failure_counts()
    token = issuer.token(SERVICE, alg="RS384", headers={"kid": issuer.kid("ES384")})
    refused(client.post(SERVICE, headers={"Authorization": f"Bearer {token}"}), "key-type", before)


def test_unknown_kid_refused(client, issuer):
    before = failure_counts()
    issuer.rotate("ES384")  # new key, not published in the JWKS file
    refused(client.post(SERVICE, headers=issuer.headers(SERVICE)), "kid", before)


def test_wrong_key_with_known_kid_refused(client, issuer, tmp_path):
    before = failure_counts()
    forger = TestIssuer(tmp_path, algs=["ES384"])
    token = forger.token(SERVICE, iss=issuer.issuer, headers={"kid": issuer.kid("ES384")})
    refused(client.post(SERVICE, headers={"Authorization": f"Bearer {token}"}), "signature", before)


def test_rotated_key_file_is_reread(client, issuer):
    issuer.rotate("ES384")
    issuer.write_jwks()
    assert client.post(SERVICE, headers=issuer.headers(SERVICE)).status_code == 200


def test_issuer_not_on_allow_list_refused(client, issuer, tmp_path):
    before = failure_counts()
    stranger = TestIssuer(tmp_path)
    refused(client.post(SERVICE, headers=stranger.headers(SERVICE)), "issuer", before)


def test_issuer_claim_missing_refused(client, issuer):
    before = failure_counts()
    refused(client.post(SERVICE, headers=issuer.headers(SERVICE, iss=None)), "issuer", before)


@pytest.mark.parametrize(
    "aud",
    [
        DISCOVERY,  # discovery aud used on a service call
        f"{BASE}/cds-services/other-service",
        f"{SERVICE}/",  # trailing slash
        f"{SERVICE}?x=1",
        FEEDBACK,
        "https://testserver/cds-services/mg-k-patient-view",  # other scheme
        "http://testserver:8080/cds-services/mg-k-patient-view",
        "/cds-services/mg-k-patient-view",
    ],
)
def test_wrong_audience_refused(client, issuer, aud):
    before = failure_counts()
    refused(client.post(SERVICE, headers=issuer.headers(aud)), "audience", before)


def test_feedback_needs_its_own_audience(client, issuer):
    before = failure_counts()
    refused(client.post(FEEDBACK, headers=issuer.headers(SERVICE)), "audience", before)


def test_expired_refused(client, issuer):
    before = failure_counts()
    now = int(time.time())
    refused(client.post(SERVICE, headers=issuer.headers(SERVICE, iat=now - 400, exp=now - 60)), "expired", before)


def test_iat_in_future_beyond_leeway_refused(client, issuer):
    before = failure_counts()
    now = int(time.time())
    headers = issuer.headers(SERVICE, iat=now + 120, exp=now + 400)
    refused(client.post(SERVICE, headers=headers), "not-yet-valid", before)


def test_nbf_in_future_refused(client, issuer):
    before = failure_counts()
    headers = issuer.headers(SERVICE, nbf=int(time.time()) + 120)
    refused(client.post(SERVICE, headers=headers), "not-yet-valid", before)


@pytest.mark.parametrize("claim", ["exp", "iat", "jti", "aud"])
def test_missing_required_claim_refused(client, issuer, claim):
    before = failure_counts()
    headers = issuer.headers(None) if claim == "aud" else issuer.headers(SERVICE, **{claim: None})
    refused(client.post(SERVICE, headers=headers), "claims", before)


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "9999999999"},
        {"iat": str(int(time.time()))},
        {"jti": 42},
        {"jti": ""},
        {"jti": "x" * 600},
        {"exp": True},
    ],
)
def test_wrongly_typed_claims_refused(client, issuer, claims):
    before = failure_counts()
    response = client.post(SERVICE, headers=issuer.headers(SERVICE, **claims))
    assert response.status_code == 401
    assert sum(failure_counts().values()) == sum(before.values()) + 1


def test_overlong_lifetime_refused(client, issuer):
    before = failure_counts()
    now = int(time.time())
    refused(client.post(SERVICE, headers=issuer.headers(SERVICE, exp=now + 7200)), "lifetime", before)


@pytest.mark.parametrize("extra", [{"crit": ["exp"]}, {"crit": ["b64"], "b64": False}])
def test_critical_header_extensions_refused(client, issuer, extra):
    before = failure_counts()
    refused(client.post(SERVICE, headers=issuer.headers(SERVICE, headers=extra)), "malformed", before)


def test_wrong_typ_refused(client, issuer):
    before = failure_counts()
    refused(client.post(SERVICE, headers=issuer.headers(SERVICE, headers={"typ": "at+jwt"})), "malformed", before)


def test_replayed_jti_refused_and_kept_for_token_lifetime(client, issuer):
    before = failure_counts()
    token = issuer.token(SERVICE, lifetime=240)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post(SERVICE, headers=headers).status_code == 200
    refused(client.post(SERVICE, headers=headers), "replay", before)
    claims = jwt.decode(token, options={"verify_signature": False})
    ttl = get_redis().ttl(_replay_key(load_settings(), issuer.issuer, claims["jti"]))
    assert 240 <= ttl <= 240 + 30 + 2  # lifetime + leeway


def test_same_jti_from_another_issuer_is_not_a_replay(tmp_path, monkeypatch):
    first, second = TestIssuer(tmp_path, name="a"), TestIssuer(tmp_path, name="b")
    with settings_reset():
        configure(monkeypatch, first.env(second))
        with TestClient(make_app()) as http:
            assert http.post(SERVICE, headers=first.headers(SERVICE, jti="shared")).status_code == 200
            assert http.post(SERVICE, headers=second.headers(SERVICE, jti="shared")).status_code == 200
            assert http.post(SERVICE, headers=second.headers(SERVICE, jti="shared")).status_code == 401


def test_refused_token_does_not_burn_its_jti(client, issuer):
    """jti is recorded only after the signature and claims verify."""
    forged = issuer.token(SERVICE, jti="precious", headers={"kid": issuer.kid("ES384")}, alg="RS384")
    assert client.post(SERVICE, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    assert client.post(SERVICE, headers=issuer.headers(SERVICE, jti="precious")).status_code == 200


# --- public base URL, auth off, spec example -----------------------------------------------------------------


def test_public_base_url_sets_the_expected_audience(tmp_path, monkeypatch):
    ehr = TestIssuer(tmp_path)
    public = "https://cds.example.org/alerts"
    with settings_reset():
        configure(monkeypatch, ehr.env(public_base_url=public + "/"))
        with TestClient(make_app()) as http:
            good = f"{public}/cds-services/mg-k-patient-view"
            assert http.post(SERVICE, headers=ehr.headers(good)).status_code == 200
            assert http.post(SERVICE, headers=ehr.headers(SERVICE)).status_code == 401


def test_public_base_url_with_a_proxy_prefix_and_root_path(tmp_path, monkeypatch):
    ehr = TestIssuer(tmp_path)
    public = "https://cds.example.org/alerts"
    with settings_reset():
        configure(monkeypatch, ehr.env(public_base_url=public))
        with TestClient(make_app(), root_path="/alerts") as http:
            good = f"{public}/cds-services/mg-k-patient-view"
            assert http.post("/alerts/cds-services/mg-k-patient-view", headers=ehr.headers(good)).status_code == 200
            doubled = f"{public}/alerts/cds-services/mg-k-patient-view"
            assert http.post("/alerts/cds-services/mg-k-patient-view", headers=ehr.headers(doubled)).status_code == 401


def test_tenant_allow_list(tmp_path, monkeypatch):
    ehr, other = TestIssuer(tmp_path, name="a"), TestIssuer(tmp_path, name="b")
    env = {**ehr.env(other), "EHR_ALERTS_CDS_TENANTS": json.dumps({ehr.issuer: ["hospital-a", "hospital-b"]})}
    with settings_reset():
        configure(monkeypatch, env)
        with TestClient(make_app()) as http:
            assert http.post(SERVICE, headers=ehr.headers(SERVICE, tenant="hospital-b")).status_code == 200
            for tenant in ("hospital-c", None):
                before = failure_counts()
                refused(http.post(SERVICE, headers=ehr.headers(SERVICE, tenant=tenant)), "tenant", before)
            assert http.post(SERVICE, headers=other.headers(SERVICE, tenant="anything")).status_code == 200
            assert http.post(SERVICE, headers=other.headers(SERVICE)).status_code == 200


def test_auth_switched_off_explicitly(tmp_path, monkeypatch):
    with settings_reset():
        configure(monkeypatch, {"EHR_ALERTS_CDS_AUTH_ENABLED": "false"})
        with TestClient(make_app()) as http:
            response = http.post(SERVICE)
            assert response.status_code == 200
            assert response.json()["actor"] == "ehr:unauthenticated"
        warnings = security_startup_warnings(load_settings())
        assert any("AUTHENTICATION IS OFF" in w for w in warnings)


def test_auth_is_on_by_default(monkeypatch):
    with settings_reset():
        configure(monkeypatch, {})
        assert load_settings().cds_auth_enabled is True
        with TestClient(make_app()) as http:
            assert http.get(DISCOVERY).status_code == 401
        assert any("EHR_ALERTS_CDS_ISSUERS is empty" in w for w in security_startup_warnings(load_settings()))


def test_spec_example_jwt_signature_verifies_against_spec_jwks():
    token = (SPEC / "example-jwt.txt").read_text().strip()
    jwk = json.loads((SPEC / "example-jwks.json").read_text())["keys"][0]
    key = jwt.PyJWK(jwk).key
    claims = jwt.decode(
        token, key, algorithms=["ES384"], audience="https://cds.example.org/cds-services/some-service",
        options={"verify_exp": False},
    )  # fmt: skip
    assert claims["iss"] == "https://fhir-ehr.example.com/"
    assert jwt.get_unverified_header(token)["kid"] == "example-kid"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"), key, algorithms=["ES384"],
                   options={"verify_exp": False})  # fmt: skip


def test_spec_example_jwt_refused_as_expired(monkeypatch):
    env = {
        "EHR_ALERTS_CDS_ISSUERS": json.dumps({"https://fhir-ehr.example.com/": str(SPEC / "example-jwks.json")}),
        "EHR_ALERTS_PUBLIC_BASE_URL": "https://cds.example.org",
    }
    token = (SPEC / "example-jwt.txt").read_text().strip()
    with settings_reset():
        configure(monkeypatch, env)
        before = failure_counts()
        with TestClient(make_app()) as http:
            response = http.post("/cds-services/some-service", headers={"Authorization": f"Bearer {token}"})
        # "expired" (not "signature", "kid" or "audience"): PyJWT checks the signature before the claims.
        refused(response, "expired", before)


def test_tokens_never_reach_the_logs(client, issuer, caplog):
    caplog.set_level(logging.DEBUG)
    good = issuer.token(SERVICE)
    expired = issuer.token(SERVICE, iat=int(time.time()) - 600, exp=int(time.time()) - 300)
    for token in (good, good, expired, "x.y.z"):
        client.post(SERVICE, headers={"Authorization": f"Bearer {token}"})
    text = caplog.text + " ".join(str(r.args) for r in caplog.records)
    assert "auth refused: realm=cds reason=replay" in caplog.text
    for token in (good, expired):
        for part in token.split("."):
            assert part not in text
