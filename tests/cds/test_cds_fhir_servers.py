"""fhirServer allow-list (EHR_ALERTS_CDS_FHIR_SERVERS): a CDS client may only make the service query the FHIR
servers registered for its issuer. Through the ASGI app with real client JWTs and a real loopback FHIR server,
whose request log proves a refused server is never contacted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from auth_helpers import TestIssuer
from cds_support import HYPOK, REFRACTORY, SERVICE, hook_request, prefetch_for, scenario
from fastapi.testclient import TestClient
from loopback_fhir import LoopbackFhir, LoopbackServer
from pydantic import ValidationError

from config.settings import Settings, get_settings
from service.app import app
from service.cds.fhir_servers import fhir_server_refusal

PATH = f"/cds-services/{SERVICE['patient-view']}"


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> TestIssuer:
    return TestIssuer(tmp_path_factory.mktemp("issuer"))


@pytest.fixture(scope="module")
def fhir() -> Iterator[LoopbackFhir]:
    with LoopbackServer() as server:
        yield server


@contextmanager
def running(issuer: TestIssuer, servers: dict[str, list[str]] | None, strict: bool = False) -> Iterator[TestClient]:
    """The app trusting ``issuer``, with the given allow-list; every request carries a fresh JWT."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in issuer.env().items():
            mp.setenv(name, value)
        mp.setenv("EHR_ALERTS_CDS_FHIR_REQUIRE_HTTPS", "false")  # the loopback server speaks http
        mp.setenv("EHR_ALERTS_CDS_FHIR_SERVERS_STRICT", str(strict).lower())
        if servers is not None:
            mp.setenv("EHR_ALERTS_CDS_FHIR_SERVERS", json.dumps(servers))
        else:
            mp.delenv("EHR_ALERTS_CDS_FHIR_SERVERS", raising=False)
        get_settings.cache_clear()

        def sign(request: httpx.Request) -> None:
            request.headers["Authorization"] = f"Bearer {issuer.token(str(request.url.copy_with(query=None)))}"

        try:
            with TestClient(app, raise_server_exceptions=False) as client:
                client.event_hooks = {"request": [sign], "response": []}
                yield client
        finally:
            get_settings.cache_clear()


def call(client: TestClient, body: dict[str, Any]) -> httpx.Response:
    response = client.post(PATH, json=body)
    assert response.status_code != 401, "the test token was refused: the test would prove nothing"
    return response


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 412, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["fhirServer"]
    assert "fhirServer" in outcome["issue"][0]["diagnostics"]


def test_a_server_not_registered_for_the_issuer_is_refused_and_never_contacted(
    issuer: TestIssuer, fhir: LoopbackFhir
) -> None:
    patient = "allow1"
    fhir.reset(scenario(HYPOK, patient))
    with running(issuer, {issuer.issuer: ["https://fhir.hospital.example/r4"]}) as client:
        response = call(client, hook_request("patient-view", patient, None, fhir_server=fhir.url))
    assert_refused(response)
    assert fhir.requests == []


def test_a_refused_server_fails_the_call_even_when_the_prefetch_is_complete(
    issuer: TestIssuer, fhir: LoopbackFhir
) -> None:
    """A misconfigured EHR learns it on its first call, not only on the calls that happen to need a fetch."""
    patient = "allow2"
    fhir.reset(scenario(HYPOK, patient))
    prefetch = prefetch_for(scenario(HYPOK, patient), patient)
    with running(issuer, {issuer.issuer: ["https://fhir.hospital.example/r4"]}) as client:
        assert_refused(call(client, hook_request("patient-view", patient, prefetch, fhir_server=fhir.url)))
        # without fhirServer the same call is fine: nothing would be fetched anyway
        response = call(client, hook_request("patient-view", patient, prefetch, fhir_server=None))
    assert response.status_code == 200, response.text
    assert fhir.requests == []


def test_a_registered_server_is_queried(issuer: TestIssuer, fhir: LoopbackFhir) -> None:
    patient = "allow3"
    fhir.reset(scenario(REFRACTORY, patient))
    with running(issuer, {issuer.issuer: ["https://other.example/fhir", fhir.url + "/"]}) as client:
        response = call(client, hook_request("patient-view", patient, None, fhir_server=fhir.url))
    assert response.status_code == 200, response.text
    assert [c["indicator"] for c in response.json()["cards"]] == ["warning"]
    assert fhir.requests, "the registered server was not queried"


@pytest.mark.parametrize(
    "suffix",
    ["x", "/../admin", "/%2e%2e/admin", "/r4?x=1"],
    ids=["longer-segment", "dot-segments", "encoded-dots", "query"],
)
def test_lookalikes_of_a_registered_server_are_refused(issuer: TestIssuer, fhir: LoopbackFhir, suffix: str) -> None:
    patient = "allow4"
    fhir.reset(scenario(HYPOK, patient))
    with running(issuer, {issuer.issuer: [fhir.url]}) as client:
        response = call(client, hook_request("patient-view", patient, None, fhir_server=fhir.url + suffix))
    assert_refused(response)
    assert fhir.requests == []


def test_unlisted_issuers_may_name_any_server_by_default(issuer: TestIssuer, fhir: LoopbackFhir) -> None:
    """The default (documented): the allow-list binds the issuers it lists; onboarding a new EHR needs no entry."""
    patient = "allow5"
    fhir.reset(scenario(HYPOK, patient))
    with running(issuer, {"https://another-ehr.example": ["https://fhir.another.example"]}) as client:
        response = call(client, hook_request("patient-view", patient, None, fhir_server=fhir.url))
    assert response.status_code == 200, response.text
    assert fhir.requests


def test_strict_mode_refuses_servers_of_unlisted_issuers(issuer: TestIssuer, fhir: LoopbackFhir) -> None:
    patient = "allow6"
    fhir.reset(scenario(HYPOK, patient))
    with running(issuer, None, strict=True) as client:
        response = call(client, hook_request("patient-view", patient, None, fhir_server=fhir.url))
        assert_refused(response)
        assert fhir.requests == []
        # strict mode does not affect calls that name no server
        prefetch = prefetch_for(scenario(HYPOK, patient), patient)
        assert call(client, hook_request("patient-view", patient, prefetch, fhir_server=None)).status_code == 200


def _settings(servers: Any, strict: bool = False) -> Settings:
    return Settings(cds_fhir_servers=servers, cds_fhir_servers_strict=strict)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://fhir.example.org/r4", True),
        ("https://fhir.example.org/r4/", True),
        ("https://FHIR.example.org:443/r4", True),  # host case and the default port do not matter
        ("https://fhir.example.org/r4/tenant-a", True),
        ("https://fhir.example.org/r4b", False),
        ("https://fhir.example.org", False),
        ("http://fhir.example.org/r4", False),  # another scheme
        ("https://fhir.example.org:8443/r4", False),  # another port
        ("https://fhir.example.org.evil.example/r4", False),
        ("https://fhir.example.org@evil.example/r4", False),
        ("https://evil.example/r4", False),
        ("https://fhir.example.org/r4/./x", False),
        ("https://fhir.example.org/r4/%2F..%2Fadmin", False),
        ("https://fhir.example.org/r4#x", False),
    ],
)
def test_prefix_matching(url: str, allowed: bool) -> None:
    settings = _settings({"iss": ["https://fhir.example.org/r4"]})
    assert (fhir_server_refusal("iss", url, settings) is None) is allowed


def test_no_fhir_server_is_never_refused() -> None:
    assert fhir_server_refusal("iss", None, _settings({"iss": ["https://a.example"]}, strict=True)) is None
    assert fhir_server_refusal("other", None, _settings({}, strict=True)) is None


@pytest.mark.parametrize(
    "servers",
    [
        '{"iss": ["fhir.example.org/r4"]}',
        '{"iss": ["ftp://fhir.example.org"]}',
        '{"iss": ["https://user@fhir.example.org"]}',
        '{"iss": ["https://fhir.example.org/r4?x=1"]}',
        '{"iss": "https://fhir.example.org"}',
        "[1, 2]",
        "not json",
    ],
)
def test_bad_allow_lists_are_refused_at_start(servers: str) -> None:
    with pytest.raises(ValidationError, match="cds_fhir_servers"):
        _settings(servers)


def test_the_setting_reads_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EHR_ALERTS_CDS_FHIR_SERVERS", '{"https://ehr.example": ["https://fhir.example.org/r4"]}')
    assert Settings().cds_fhir_servers == {"https://ehr.example": ["https://fhir.example.org/r4"]}


def test_start_up_warns_about_issuers_without_an_allow_list(issuer: TestIssuer) -> None:
    from service.security.startup import security_startup_warnings

    base = {"cds_issuers": {issuer.issuer: str(issuer.write_jwks())}, "public_base_url": "https://cds.example.org"}
    open_servers = [w for w in security_startup_warnings(Settings(**base)) if "EHR_ALERTS_CDS_FHIR_SERVERS" in w]
    assert len(open_servers) == 1 and "1 trusted CDS client" in open_servers[0]
    listed = Settings(**base, cds_fhir_servers={issuer.issuer: ["https://fhir.example.org"]})
    strict = Settings(**base, cds_fhir_servers_strict=True)
    for settings in (listed, strict):
        assert not [w for w in security_startup_warnings(settings) if "EHR_ALERTS_CDS_FHIR_SERVERS" in w]
