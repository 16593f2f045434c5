"""Black-box CDS Hooks 2.0.1 conformance audit: what an EHR vendor's certification client checks from outside.

The app runs under uvicorn on loopback and is reached only over HTTP, with real CDS client JWTs
(tests/auth_helpers.TestIssuer) and a real loopback FHIR server (tests/loopback_fhir.py). Requests are built
from what discovery advertises (keys and templates parsed from ``GET /cds-services``), not from the service's
Python code. This suite complements tests/integration/test_cds_hooks.py (the §17 checklist) with the
normative MUST/SHALL rules that file does not pin down precisely; each test names the rule it checks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import jwt
import pytest
import redis
from auth_helpers import TestIssuer, unsigned_token
from cds_support import ARRHYTHMIA, HYPOK, REFRACTORY, TOKEN, draft_kcl, empty_members, scenario, searchset, validate
from fhir_builders import potassium
from loopback_fhir import LoopbackFhir, LoopbackServer, matches
from markdown_it import MarkdownIt

from config.settings import Settings, get_settings
from rules.normalize import normalize_resource
from workers.events import dump_batch, events_from
from workers.state.store import Store

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SPEC_EXAMPLES = ROOT / "tests" / "data" / "shared" / "cds-hooks"
ORIGIN = "https://ehr.example.org"
TOKEN_RE = re.compile(r"\{\{(.*?)\}\}")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# CDS Hooks 2.0.1 §Prefetch tokens: context.<field> of the hook, or the four user*Id tokens.
USER_TOKENS = {"userPractitionerId", "userPractitionerRoleId", "userPatientId", "userRelatedPersonId"}
# Members the 2.0.1 data types define (anything else belongs under ``extension``).
DISCOVERY_MEMBERS = {"hook", "title", "description", "id", "prefetch", "usageRequirements", "extension"}
CARD_MEMBERS = {
    "uuid",
    "summary",
    "detail",
    "indicator",
    "source",
    "suggestions",
    "selectionBehavior",
    "overrideReasons",
    "links",
    "extension",
}
SOURCE_MEMBERS = {"label", "url", "icon", "topic", "extension"}
SUGGESTION_MEMBERS = {"label", "uuid", "isRecommended", "actions", "extension"}
ACTION_MEMBERS = {"type", "description", "resource", "resourceId", "extension"}
LINK_MEMBERS = {"label", "url", "type", "appContext", "autolaunchable", "extension"}
CODING_MEMBERS = {"system", "code", "display"}


# --- the app under test ---------------------------------------------------------------------------------


class Client:
    """An external CDS client: signs every request for its exact URL, knows only what discovery says."""

    def __init__(self, base: str, fhir: LoopbackFhir, issuer: TestIssuer, logs: Path) -> None:
        self.base, self.fhir, self.issuer, self.logs = base, fhir, issuer, logs
        self.http = httpx.Client(timeout=30, event_hooks={"request": [self._sign]})
        self.services: list[dict[str, Any]] = []
        self.store: Store | None = None  # the alert store of the stream (same Redis and prefix as the app)

    def stream(self, resources: list[dict[str, Any]]) -> None:
        """The same data through the stream pipeline (as ingestion would deliver it), in process."""
        from workers.pipeline import process_batch

        assert self.store is not None
        events = [events_from(normalize_resource(r), received=datetime.now(UTC)) for r in resources]
        process_batch(dump_batch([e for e in events if e is not None]), self.store)

    def _sign(self, request: httpx.Request) -> None:
        if "authorization" not in request.headers and "x-no-auth" not in request.headers:
            request.headers["Authorization"] = f"Bearer {self.issuer.token(str(request.url.copy_with(query=None)))}"
        request.headers.pop("x-no-auth", None)

    def url(self, service_id: str | None = None, feedback: bool = False) -> str:
        url = f"{self.base}/cds-services"
        if service_id:
            url += f"/{service_id}"
        return url + ("/feedback" if feedback else "")

    def service(self, hook: str) -> dict[str, Any]:
        return next(s for s in self.services if s["hook"] == hook)

    def call(self, hook: str, body: Any, **kwargs: Any) -> httpx.Response:
        response = self.http.post(self.url(self.service(hook)["id"]), json=body, **kwargs)
        assert response.status_code < 500, response.text
        return response

    def cards(self, hook: str, body: Any) -> list[dict[str, Any]]:
        response = self.call(hook, body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].split(";")[0] == "application/json"
        validate(response.json(), "ServiceResponse")
        return response.json()["cards"]

    def feedback(self, hook: str, body: Any, **kwargs: Any) -> httpx.Response:
        response = self.http.post(self.url(self.service(hook)["id"], feedback=True), json=body, **kwargs)
        assert response.status_code < 500, response.text
        return response


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def client(module_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """uvicorn with production-like settings (https-only FHIR fetches off for the loopback server)."""
    logs = tmp_path_factory.mktemp("cds-conformance")
    prefix = f"conf-{uuid.uuid4().hex[:12]}"
    issuer = TestIssuer(logs)
    env = {
        **os.environ,
        **issuer.env(),
        "EHR_ALERTS_CORS_ORIGINS": ORIGIN,
        "REDIS_URL": module_redis_url,
        "EHR_ALERTS_KEY_PREFIX": prefix,
        "EHR_ALERTS_CDS_FHIR_REQUIRE_HTTPS": "false",
        "EHR_ALERTS_CDS_FHIR_TIMEOUT_SECONDS": "1.5",
        "EHR_ALERTS_CDS_FHIR_PAGE_SIZE": "5",
        "PYTHONUNBUFFERED": "1",
    }
    port = _free_port()
    log = open(logs / "api.log", "wb")  # noqa: SIM115 - closed below
    api = subprocess.Popen(
        [str(ROOT / ".venv/bin/uvicorn"), "service.app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    old_prefix = os.environ.get("EHR_ALERTS_KEY_PREFIX")
    try:
        while True:
            assert api.poll() is None, (logs / "api.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "API did not start"
            time.sleep(0.1)
        # The stream's Store takes its key prefix from get_settings(): point it at the app's.
        os.environ["EHR_ALERTS_KEY_PREFIX"] = prefix
        get_settings.cache_clear()
        with LoopbackServer() as fhir:
            c = Client(base, fhir, issuer, logs)
            c.store = Store(
                redis.Redis.from_url(module_redis_url, decode_responses=True),
                Settings(redis_url=module_redis_url, key_prefix=prefix),
            )
            response = c.http.get(c.url())
            assert response.status_code == 200, response.text
            c.services = response.json()["services"]
            yield c
            c.http.close()
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(10)
        log.close()
        if old_prefix is None:
            os.environ.pop("EHR_ALERTS_KEY_PREFIX", None)
        else:
            os.environ["EHR_ALERTS_KEY_PREFIX"] = old_prefix
        get_settings.cache_clear()


@pytest.fixture
def fhir(client: Client) -> LoopbackFhir:
    client.fhir.reset()
    return client.fhir


# --- request builders from discovery ----------------------------------------------------------------------


def patient_id() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


def hours_ago(hours: float) -> str:
    return (datetime.now(UTC) - timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_template(template: str, resources: list[dict[str, Any]], patient: str) -> dict[str, Any] | None:
    """What an EHR puts in the prefetch for one advertised template: a searchset (or a read's resource)."""
    query = template.replace("{{context.patientId}}", patient).replace("{{context.userId}}", "Practitioner/example")
    assert "{{" not in query, query
    path, _, params = query.partition("?")
    if "/" in path:  # instance read
        kind, ident = path.split("/", 1)
        return next((r for r in resources if r["resourceType"] == kind and r.get("id") == ident), None)
    pairs = parse_qsl(params)
    return searchset([r for r in resources if matches(r, path, pairs)])


def prefetch(client: Client, hook: str, resources: list[dict[str, Any]], patient: str) -> dict[str, Any]:
    """Every advertised key of the hook's service, filled from ``resources``."""
    templates = client.service(hook).get("prefetch", {})
    return {key: run_template(t, resources, patient) for key, t in templates.items()}


def request(
    hook: str,
    patient: str,
    prefetch: dict[str, Any] | None,
    *,
    fhir_server: str | None = None,
    orders: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": patient}
    if hook != "patient-view":
        drafts = orders if orders is not None else [draft_kcl(patient)]
        context["draftOrders"] = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": d} for d in drafts],
        }
        if hook == "order-select":
            context["selections"] = [f"{drafts[0]['resourceType']}/{drafts[0]['id']}"]
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if fhir_server:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {
            "access_token": TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Observation.read patient/MedicationRequest.read",
            "subject": "ehr-alerts",
            "patient": patient,
        }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


def full(client: Client, hook: str, rule: str | None, patient: str | None = None) -> dict[str, Any]:
    patient = patient or patient_id()
    return request(hook, patient, prefetch(client, hook, scenario(rule, patient), patient))


def hooks(client: Client) -> list[str]:
    return [s["hook"] for s in client.services]


def now_stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- Discovery ----------------------------------------------------------------------------------------------


def test_discovery_members_are_spec_members_with_valid_values(client: Client) -> None:
    """§Discovery: hook, description, id REQUIRED strings; title RECOMMENDED; prefetch object of strings;
    usageRequirements string. No other members outside ``extension``; no null/empty values."""
    response = client.http.get(client.url(), headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == "application/json"
    body = response.json()
    validate(body, "DiscoveryResponse")
    assert set(body) == {"services"} and body["services"]
    assert empty_members(body) == []
    seen = set()
    for service in body["services"]:
        assert set(service) <= DISCOVERY_MEMBERS, set(service) - DISCOVERY_MEMBERS
        for member in ("hook", "description", "id", "title"):
            assert isinstance(service[member], str) and service[member].strip()
        assert (service["id"], service["hook"]) not in seen
        seen.add((service["id"], service["hook"]))
        if "usageRequirements" in service:
            text = service["usageRequirements"]
            assert isinstance(text, str) and text.strip()
            assert not re.search(r"\{[a-z_]+\}", text), f"unformatted placeholder in usageRequirements: {text!r}"
        assert isinstance(service.get("prefetch", {}), dict)


def test_prefetch_templates_are_2_0_relative_fhir_queries(client: Client) -> None:
    """§Prefetch Template: relative FHIR read/search URLs; tokens ``{{context.<field>}}`` (tokenizable fields of the
    hook) or user*Id; no FHIRPath (3.0 ballot); recommended query subset only."""
    tokenizable = {"userId", "patientId", "encounterId"}
    for service in client.services:
        for key, template in service.get("prefetch", {}).items():
            assert re.fullmatch(r"[A-Za-z0-9_\-.]+", key), key
            assert isinstance(template, str) and template and not template.startswith(("/", "http"))
            kind = template.split("?")[0].split("/")[0]
            assert re.fullmatch(r"[A-Z][A-Za-z]+", kind), template
            for token in TOKEN_RE.findall(template):
                assert token == token.strip(), template
                if token.startswith("context."):
                    assert token.removeprefix("context.") in tokenizable, template
                else:
                    assert token in USER_TOKENS, template
            assert "{{" not in TOKEN_RE.sub("", template) and "}}" not in TOKEN_RE.sub("", template)
            for name, value in parse_qsl(template.partition("?")[2], keep_blank_values=True):
                assert value, (template, name)
                assert name in ("_count", "_sort") or not name.startswith("_"), (template, name)
                if name.endswith("date") or name == "authored":
                    assert re.match(r"^(eq|lt|gt|ge|le)?\{\{", value) or value[:2] in ("eq", "lt", "gt", "ge", "le")


def test_discovery_is_the_same_on_every_call(client: Client) -> None:
    """Services are identified by id: discovery is stable between calls (an EHR caches it)."""
    assert client.http.get(client.url()).json()["services"] == client.services


# --- Responses against the derived schema, for every hook -----------------------------------------------------


@pytest.mark.parametrize("rule", [HYPOK, REFRACTORY, ARRHYTHMIA, None])
def test_every_hook_answers_schema_valid_cards(client: Client, fhir: LoopbackFhir, rule: str | None) -> None:
    """§CDS Service Response: ``cards`` REQUIRED; card members per §Card Attributes; no null/empty members."""
    for hook in hooks(client):
        response = client.call(hook, full(client, hook, rule))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].split(";")[0] == "application/json"
        body = response.json()
        validate(body, "ServiceResponse")
        assert empty_members(body) == []
        assert set(body) <= {"cards", "systemActions", "extension"}
        assert (len(body["cards"]) > 0) == (rule is not None), (hook, rule, body)
        check_cards(body["cards"], body.get("systemActions"))
    assert fhir.requests == []  # complete prefetch: the FHIR server is never asked


def check_coding(coding: dict[str, Any], display: bool) -> None:
    assert set(coding) <= CODING_MEMBERS
    assert isinstance(coding["system"], str) and coding["system"]
    assert isinstance(coding["code"], str) and coding["code"]
    if display:
        assert isinstance(coding["display"], str) and coding["display"].strip()


def check_action(action: dict[str, Any]) -> None:
    """§Action: type create|update|delete; description REQUIRED; resource for create/update, resourceId
    (relative reference) for delete."""
    assert set(action) <= ACTION_MEMBERS
    assert action["type"] in ("create", "update", "delete")
    assert isinstance(action["description"], str) and action["description"].strip()
    if action["type"] in ("create", "update"):
        resource = action["resource"]
        assert isinstance(resource, dict) and isinstance(resource["resourceType"], str)
        if action["type"] == "update":
            assert resource.get("id")
        assert "resourceId" not in action
    else:
        assert re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}", action["resourceId"])


def check_cards(cards: list[dict[str, Any]], system_actions: list[dict[str, Any]] | None = None) -> None:
    """Every card-level MUST of 2.0.1 §Card Attributes, §Source, §Suggestion, §Action, §Link."""
    uuids: list[str] = []
    order = {"critical": 0, "warning": 1, "info": 2}
    assert [order[c["indicator"]] for c in cards] == sorted(order[c["indicator"]] for c in cards)
    for card in cards:
        assert set(card) <= CARD_MEMBERS, set(card) - CARD_MEMBERS
        assert isinstance(card["summary"], str) and 0 < len(card["summary"]) < 140
        assert len(card["summary"].encode("utf-16-le")) // 2 < 140  # as a JavaScript client counts
        assert "\n" not in card["summary"]
        assert card["indicator"] in ("info", "warning", "critical")
        assert UUID_RE.match(card["uuid"]), card["uuid"]
        uuids.append(card["uuid"])
        source = card["source"]
        assert set(source) <= SOURCE_MEMBERS
        assert isinstance(source["label"], str) and source["label"].strip()
        for member in ("url", "icon"):
            if member in source:
                assert re.match(r"^https?://[^\s/]+", source[member]), source[member]
        if "topic" in source:
            check_coding(source["topic"], display=False)
        if "detail" in card:
            assert isinstance(card["detail"], str) and card["detail"].strip()
        suggestions = card.get("suggestions", [])
        if suggestions:
            assert card["selectionBehavior"] in ("at-most-one", "any")
        else:
            assert "selectionBehavior" not in card
        recommended = 0
        for suggestion in suggestions:
            assert set(suggestion) <= SUGGESTION_MEMBERS
            assert isinstance(suggestion["label"], str) and suggestion["label"].strip()
            assert UUID_RE.match(suggestion["uuid"])
            uuids.append(suggestion["uuid"])
            if "isRecommended" in suggestion:
                assert isinstance(suggestion["isRecommended"], bool)
                recommended += suggestion["isRecommended"]
            for action in suggestion.get("actions", []):
                check_action(action)
        if card.get("selectionBehavior") == "at-most-one":
            assert recommended <= 1
        for reason in card.get("overrideReasons", []):
            check_coding(reason, display=True)
        for link in card.get("links", []):
            assert set(link) <= LINK_MEMBERS
            assert isinstance(link["label"], str) and link["label"].strip()
            assert re.match(r"^https?://[^\s/]+", link["url"]), link["url"]
            assert link["type"] in ("absolute", "smart")
            if "appContext" in link:
                assert link["type"] == "smart" and isinstance(link["appContext"], str)
            if "autolaunchable" in link:
                assert isinstance(link["autolaunchable"], bool)
    assert len(uuids) == len(set(uuids))
    if system_actions is not None:
        assert isinstance(system_actions, list) and system_actions
        for action in system_actions:
            check_action(action)


def test_suggested_resources_name_the_patient_of_the_call(client: Client, fhir: LoopbackFhir) -> None:
    """§Action: the resource is the one the EHR would create for this patient (subject = context.patientId)."""
    for hook in hooks(client):
        patient = patient_id()
        for card in client.cards(hook, full(client, hook, ARRHYTHMIA, patient)):
            for action in (a for s in card["suggestions"] for a in s.get("actions", [])):
                if "resource" in action:
                    assert action["resource"]["subject"]["reference"] == f"Patient/{patient}"


def test_card_and_suggestion_uuids_are_stable_for_the_same_episode(client: Client, fhir: LoopbackFhir) -> None:
    """§Card: uuid is what feedback names, so a card re-shown for the same episode keeps it (with a new
    hookInstance, and across hooks); another patient's episode has another uuid."""
    patient = patient_id()
    resources = scenario(HYPOK, patient)
    ids = []
    for hook in [*hooks(client), "patient-view"]:
        (card,) = client.cards(hook, request(hook, patient, prefetch(client, hook, resources, patient)))
        ids.append((card["uuid"], tuple(s["uuid"] for s in card["suggestions"])))
    assert len(set(ids)) == 1, ids
    (other,) = client.cards("patient-view", full(client, "patient-view", HYPOK))
    assert other["uuid"] != ids[0][0]
    assert not set(s["uuid"] for s in other["suggestions"]) & set(ids[0][1])


# --- Every spec example request ---------------------------------------------------------------------------------


def spec_requests() -> list[tuple[str, dict[str, Any]]]:
    examples = [(p.name, json.loads(p.read_text())) for p in sorted(SPEC_EXAMPLES.glob("*request-*.json"))]
    reference = Path("/work/shared/reference/spec-2.0.1-examples.json")
    if reference.is_file():
        examples += [
            (f"spec-2.0.1-examples[{i}]", e["json"])
            for i, e in enumerate(json.loads(reference.read_text())["examples"])
            if e["def"] == "ServiceRequest"
        ]
    return examples


def adapt(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    """A spec example aimed at our service: our prefetch keys as "no data" (null), a fresh hookInstance,
    the example's other members (fhirServer, fhirAuthorization, extension, foreign prefetch keys) kept."""
    body = json.loads(json.dumps(body))
    body["hookInstance"] = str(uuid.uuid4())
    keys = client.service(body["hook"]).get("prefetch", {})
    body["prefetch"] = {**body.get("prefetch", {}), **dict.fromkeys(keys)}
    return body


def test_spec_example_requests_as_is(client: Client) -> None:
    """Each example request of the spec, sent unchanged: 412 when our data cannot be had (its fhirServer is not
    reachable https and it carries none of our prefetch keys), 400 when the example is not a valid request for
    the hook (spec-example bugs: no patientId; the 1.0 ``medications`` context); never a 5xx."""
    examples = spec_requests()
    assert len(examples) >= 5
    for name, body in examples:
        if body.get("hook") not in hooks(client):
            continue
        response = client.call(body["hook"], body)
        context = body.get("context", {})
        valid = "patientId" in context and (body["hook"] == "patient-view" or "draftOrders" in context)
        expected = 412 if valid else 400
        assert response.status_code == expected, (name, response.status_code, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"


def test_spec_example_requests_with_our_prefetch_answer_schema_valid_cards(client: Client, fhir: LoopbackFhir) -> None:
    """The same examples with our prefetch keys present (no data): 200 and a ServiceResponse; the example's
    ``fhirServer`` is never contacted and its foreign keys and ``extension`` members are ignored."""
    answered = 0
    for name, body in spec_requests():
        context = body.get("context", {})
        if body.get("hook") not in hooks(client) or "patientId" not in context:
            continue
        if body["hook"] != "patient-view" and "draftOrders" not in context:
            continue
        response = client.call(body["hook"], adapt(client, body))
        assert response.status_code == 200, (name, response.text)
        validate(response.json(), "ServiceResponse")
        assert empty_members(response.json()) == []
        check_cards(response.json()["cards"])
        answered += 1
    assert answered >= 4
    assert fhir.requests == []


# --- HTTP status semantics and content types ----------------------------------------------------------------


def test_bad_bodies_are_400_operation_outcomes(client: Client, fhir: LoopbackFhir) -> None:
    """Never a 5xx from input; errors are JSON OperationOutcomes (3.0 ballot convention)."""
    url = client.url(client.service("patient-view")["id"])
    good = full(client, "patient-view", None)
    cases: list[tuple[bytes, int]] = [
        (b"", 400),
        (b"null", 400),
        (b"[]", 400),
        (b'"patient-view"', 400),
        (b"{", 400),
        (json.dumps({**good, "context": []}).encode(), 400),
        (json.dumps({**good, "context": None}).encode(), 400),
        (json.dumps({**good, "hook": None}).encode(), 400),
        (json.dumps({**good, "hookInstance": 7}).encode(), 400),
        (json.dumps({**good, "prefetch": []}).encode(), 400),
        (json.dumps({**good, "fhirServer": "not a url"}).encode(), 400),
        (json.dumps({**good, "context": {**good["context"], "patientId": 42}}).encode(), 400),
    ]
    for content, status in cases:
        response = client.http.post(url, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == status, (content[:80], response.status_code, response.text)
        assert response.headers["content-type"].split(";")[0] == "application/json"
        assert response.json()["resourceType"] == "OperationOutcome"


def test_json_media_type_parameters_are_accepted(client: Client, fhir: LoopbackFhir) -> None:
    """``Content-Type: application/json; charset=utf-8`` (what axios and browsers send) is JSON."""
    url = client.url(client.service("patient-view")["id"])
    content = json.dumps(full(client, "patient-view", HYPOK)).encode()
    for media in ("application/json; charset=utf-8", "application/json;charset=UTF-8", "Application/JSON"):
        response = client.http.post(url, content=content, headers={"Content-Type": media})
        assert response.status_code == 200, (media, response.text)
        content = json.dumps({**json.loads(content), "hookInstance": str(uuid.uuid4())}).encode()
    response = client.http.post(url, content=content, headers={"Content-Type": "text/plain"})
    assert 400 <= response.status_code < 500


def test_unknown_service_and_wrong_method(client: Client) -> None:
    """Unknown service id -> 404 (JSON); discovery and services only answer their methods."""
    response = client.http.post(client.url("no-such-service"), json=full(client, "patient-view", None))
    assert response.status_code == 404 and response.json()["resourceType"] == "OperationOutcome"
    response = client.http.get(client.url(client.service("patient-view")["id"]))
    assert response.status_code in (404, 405)
    assert client.http.post(client.url(), json={}).status_code in (404, 405)


def test_412_when_required_data_cannot_be_had(client: Client, fhir: LoopbackFhir) -> None:
    """§Prefetch (SHALL): cannot access the FHIR server and the prefetch lacks keys -> 412 Precondition Failed."""
    for hook in hooks(client):
        patient = patient_id()
        data = prefetch(client, hook, scenario(HYPOK, patient), patient)
        missing_one = dict(list(data.items())[1:])
        for body in (
            request(hook, patient, None),
            request(hook, patient, {}),
            request(hook, patient, missing_one),
            request(hook, patient, missing_one, fhir_server="http://127.0.0.1:9/fhir"),
        ):
            response = client.call(hook, body)
            assert response.status_code == 412, (hook, response.text)
            assert response.json()["resourceType"] == "OperationOutcome"
        fhir.fail_status = 401
        response = client.call(hook, request(hook, patient, missing_one, fhir_server=fhir.url))
        assert response.status_code == 412
        fhir.reset()


# --- Prefetch edge cases -------------------------------------------------------------------------------------


def key_of(client: Client, concept: str) -> str:
    keys = client.service("patient-view")["prefetch"]
    assert concept in keys, sorted(keys)
    return concept


def test_prefetch_single_resource_instead_of_a_bundle(client: Client, fhir: LoopbackFhir) -> None:
    """A key may hold the one resource a read found rather than a searchset: it is the data."""
    patient = patient_id()
    data = prefetch(client, "patient-view", [], patient)
    data[key_of(client, "potassium")] = potassium(3.0, at=hours_ago(2), patient=patient)
    cards = client.cards("patient-view", request("patient-view", patient, data))
    assert [c["source"]["topic"]["code"] for c in cards] == [HYPOK]
    assert fhir.requests == []


def test_prefetch_null_and_empty_bundle_are_no_data(client: Client, fhir: LoopbackFhir) -> None:
    """``null`` (nothing found) and an empty searchset are complete answers: 200, no FHIR call."""
    patient = patient_id()
    keys = client.service("patient-view")["prefetch"]
    for value in (None, {"resourceType": "Bundle", "type": "searchset", "total": 0}):
        body = request("patient-view", patient, dict.fromkeys(keys, value))
        assert client.cards("patient-view", body) == []
    assert fhir.requests == []


def test_prefetch_operation_outcome_value(client: Client, fhir: LoopbackFhir) -> None:
    """§Prefetch: an OperationOutcome means the EHR's prefetch failed: fetch the key from fhirServer, else 412."""
    patient = patient_id()
    resources = scenario(HYPOK, patient)
    fhir.reset(resources)
    data = prefetch(client, "patient-view", resources, patient)
    failed = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    data[key_of(client, "potassium")] = failed
    assert client.call("patient-view", request("patient-view", patient, data)).status_code == 412
    cards = client.cards("patient-view", request("patient-view", patient, data, fhir_server=fhir.url))
    assert [c["source"]["topic"]["code"] for c in cards] == [HYPOK]
    assert len(fhir.requests) == 1 and fhir.requests[0].path == "/fhir/Observation"
    assert fhir.requests[0].authorization == f"Bearer {TOKEN}"


def test_prefetch_bundle_with_operation_outcome_entries(client: Client, fhir: LoopbackFhir) -> None:
    """A searchset may carry OperationOutcome entries (search.mode outcome): an error one means the search
    failed (refetch or 412); a warning/information one is a note and the Bundle's data is used."""
    patient = patient_id()
    resources = scenario(HYPOK, patient)
    key = key_of(client, "potassium")
    for severity, expected in (("information", 200), ("warning", 200), ("error", 412), ("fatal", 412)):
        data = prefetch(client, "patient-view", resources, patient)
        note = {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": "informational"}]}
        data[key]["entry"].append({"resource": note, "search": {"mode": "outcome"}})
        response = client.call("patient-view", request("patient-view", patient, data))
        assert response.status_code == expected, (severity, response.text)
        if expected == 200:
            assert [c["source"]["topic"]["code"] for c in response.json()["cards"]] == [HYPOK]
    assert fhir.requests == []


def test_prefetch_paginated_bundle(client: Client, fhir: LoopbackFhir) -> None:
    """A paginated searchset (``link`` next): the next page is read from fhirServer with the access token. When
    the next page cannot be had (no fhirServer) the call still answers 200 (§17 item 33) and says nothing new
    from its incomplete data: only stored alerts could show (none here)."""
    patient = patient_id()
    resources = scenario(REFRACTORY, patient)
    fhir.reset(resources)
    data = prefetch(client, "patient-view", resources, patient)
    key = key_of(client, "potassium")
    first, rest = data[key]["entry"][:1], data[key]["entry"][1:]
    assert rest
    fhir.reset([e["resource"] for e in rest])
    next_url = f"{fhir.url}/Observation?patient={patient}&code=http://loinc.org|2823-3&_count=5"
    data[key] = searchset([e["resource"] for e in first], link=[{"relation": "next", "url": next_url}])
    cards = client.cards("patient-view", request("patient-view", patient, data, fhir_server=fhir.url))
    assert [c["source"]["topic"]["code"] for c in cards] == [REFRACTORY]
    assert [r.path for r in fhir.requests] == ["/fhir/Observation"]
    assert fhir.requests[0].authorization == f"Bearer {TOKEN}"
    unreadable = client.call("patient-view", request("patient-view", patient, data))
    assert unreadable.status_code == 200, unreadable.text
    assert unreadable.json() == {"cards": []}


def test_prefetch_keys_not_advertised_and_other_patients_data_are_ignored(client: Client, fhir: LoopbackFhir) -> None:
    """Unknown keys are ignored; resources of another patient never make a card for this one."""
    patient, other = patient_id(), patient_id()
    data = prefetch(client, "patient-view", [], patient)
    data["patientToGreet"] = {"resourceType": "Patient", "id": patient}
    data[key_of(client, "potassium")] = searchset(scenario(HYPOK, other)[:1])
    assert client.cards("patient-view", request("patient-view", patient, data)) == []
    assert fhir.requests == []


# --- fhirAuthorization -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"token_type": "MAC"},
        {"token_type": None},
        {"access_token": None},
        {"access_token": ""},
        {"expires_in": None},
        {"expires_in": "300"},
        {"scope": None},
        {"scope": ""},
        {"subject": None},
        {"patient": 7},
    ],
)
def test_fhir_authorization_shape(client: Client, fhir: LoopbackFhir, change: dict[str, Any]) -> None:
    """§Calling a CDS Service: fhirAuthorization {access_token, token_type "Bearer", expires_in, scope, subject}
    all REQUIRED, patient a string: a malformed one is a malformed request (400 naming the member)."""
    body = request("patient-view", patient_id(), None, fhir_server=fhir.url)
    auth = {**body["fhirAuthorization"], **change}
    body["fhirAuthorization"] = {k: v for k, v in auth.items() if v is not None}
    response = client.call("patient-view", body)
    assert response.status_code == 400, (change, response.text)
    (member,) = change
    assert response.json()["issue"][0]["expression"] == [f"fhirAuthorization.{member}"]
    assert fhir.requests == []


def test_fhir_authorization_valid_forms(client: Client, fhir: LoopbackFhir) -> None:
    """token_type is case-insensitive (RFC 6749 §5.1); ``patient`` is optional; no fhirAuthorization at all
    means an open FHIR server (queried without a token)."""
    patient = patient_id()
    fhir.reset(scenario(HYPOK, patient))
    body = request("patient-view", patient, None, fhir_server=fhir.url)
    body["fhirAuthorization"] = {**body["fhirAuthorization"], "token_type": "bearer"}
    del body["fhirAuthorization"]["patient"]
    assert [c["source"]["topic"]["code"] for c in client.cards("patient-view", body)] == [HYPOK]
    assert {r.authorization for r in fhir.requests} == {f"Bearer {TOKEN}"}
    fhir.requests.clear()
    body = request("patient-view", patient, None, fhir_server=fhir.url)
    del body["fhirAuthorization"]
    assert [c["source"]["topic"]["code"] for c in client.cards("patient-view", body)] == [HYPOK]
    assert fhir.requests and {r.authorization for r in fhir.requests} == {None}


# --- CORS -----------------------------------------------------------------------------------------------------


def test_cors_on_every_endpoint_for_allowed_origins_only(client: Client, fhir: LoopbackFhir) -> None:
    """Browser CDS clients need CORS (§Security): preflight and actual responses (also 401s, so the page can
    read them) carry Access-Control-Allow-Origin for allow-listed origins only."""
    service = client.service("patient-view")["id"]
    ask = {"Access-Control-Request-Headers": "authorization,content-type", "x-no-auth": "1"}
    for url, method in ((client.url(), "GET"), (client.url(service), "POST"), (client.url(service, True), "POST")):
        ok = client.http.options(url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": method, **ask})
        assert ok.status_code == 200, url
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        assert method in ok.headers["access-control-allow-methods"]
        allowed = {h.strip().lower() for h in ok.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        bad = client.http.options(
            url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": method, **ask}
        )
        assert "access-control-allow-origin" not in bad.headers
    body = full(client, "patient-view", HYPOK)
    response = client.http.post(client.url(service), json=body, headers={"Origin": ORIGIN})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
    refused = client.http.post(client.url(service), json=body, headers={"Origin": ORIGIN, "x-no-auth": "1"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


# --- Feedback ---------------------------------------------------------------------------------------------------


def card_for(client: Client, rule: str = HYPOK) -> dict[str, Any]:
    (card,) = client.cards("patient-view", full(client, "patient-view", rule))
    return card


def test_spec_feedback_examples_with_our_uuids(client: Client, fhir: LoopbackFhir) -> None:
    """§Feedback examples (accepted with acceptedSuggestions; overridden without and with overrideReason whose
    Coding has no display and a code we do not know) are accepted: 200 with a JSON body."""
    examples = json.loads(Path("/work/shared/reference/spec-2.0.1-examples.json").read_text())["examples"]
    feedbacks = [e["json"] for e in examples if e["def"] == "FeedbackRequest" and e["expect"] == "valid"]
    assert len(feedbacks) == 3
    for example in feedbacks:
        card = card_for(client)
        body = json.loads(json.dumps(example))
        item = body["feedback"][0]
        item["card"] = card["uuid"]
        if "acceptedSuggestions" in item:
            item["acceptedSuggestions"] = [{"id": card["suggestions"][0]["uuid"]}]
        validate(body, "FeedbackRequest")
        response = client.feedback("patient-view", body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].split(";")[0] == "application/json"


@pytest.mark.parametrize(
    "stamp",
    ["1985-04-12T23:20:50.52Z", "2026-01-02T03:04:05Z", "2026-01-02T03:04:05.123456789Z", "2026-01-02t03:04:05z"],
)
def test_feedback_outcome_timestamp_rfc3339_forms(client: Client, fhir: LoopbackFhir, stamp: str) -> None:
    """§Feedback: outcomeTimestamp is an RFC 3339 UTC date-time; the spec's own example has a 2-digit fraction,
    RFC 3339 §5.6 allows any fraction length and lowercase t/z."""
    card = card_for(client)
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": stamp}
    response = client.feedback("patient-view", {"feedback": [item]})
    assert response.status_code == 200, (stamp, response.text)


@pytest.mark.parametrize(
    "item",
    [
        {"outcomeTimestamp": "2026-01-02 03:04:05Z"},
        {"outcomeTimestamp": "2026-01-02T03:04:05"},
        {"outcomeTimestamp": "2026-13-02T03:04:05Z"},
        {"outcomeTimestamp": 1767323045},
        {"outcome": "Accepted"},
        {"outcome": "accepted", "acceptedSuggestions": []},
        {"outcome": "accepted", "acceptedSuggestions": [{}]},
        {"outcome": "accepted", "acceptedSuggestions": "x"},
        {"overrideReason": {"reason": {"system": "https://x.test"}}},
        {"overrideReason": {"reason": "not a coding"}},
        {"overrideReason": "no"},
        {"overrideReason": {"userComment": 5}},
        {"card": ""},
        {"card": 5},
    ],
)
def test_feedback_member_rules(client: Client, fhir: LoopbackFhir, item: dict[str, Any]) -> None:
    """§Feedback: card, outcome (accepted | overridden) and outcomeTimestamp REQUIRED; acceptedSuggestions
    REQUIRED (non-empty, each with id) for accepted; overrideReason.reason a Coding. Malformed -> 400."""
    base = {"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": now_stamp()}
    response = client.feedback("patient-view", {"feedback": [{**base, **item}]})
    assert response.status_code == 400, (item, response.text)
    assert response.json()["resourceType"] == "OperationOutcome"


def test_feedback_batch_over_hook_instances_is_idempotent(client: Client, fhir: LoopbackFhir) -> None:
    """§Feedback: one body may report several cards from several hook calls; the same card may be reported
    again (retries): every item 200, nothing applied twice."""
    cards = [card_for(client, rule) for rule in (HYPOK, ARRHYTHMIA)]
    accept = [{"id": cards[0]["suggestions"][0]["uuid"]}]
    items = [
        {
            "card": cards[0]["uuid"],
            "outcome": "accepted",
            "acceptedSuggestions": accept,
            "outcomeTimestamp": now_stamp(),
        },
        {"card": cards[1]["uuid"], "outcome": "overridden", "outcomeTimestamp": now_stamp()},
    ]
    for _ in range(2):
        response = client.feedback("patient-view", {"feedback": items})
        assert response.status_code == 200, response.text
        assert [i["status"] for i in response.json()["feedback"]] == [200, 200]
        assert [i["alertStatus"] for i in response.json()["feedback"]] == ["accepted", "overridden"]


def test_feedback_with_an_unknown_suggestion_is_404(client: Client, fhir: LoopbackFhir) -> None:
    """acceptedSuggestions must name suggestions of that card."""
    card = card_for(client)
    item = {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": str(uuid.uuid4())}],
        "outcomeTimestamp": now_stamp(),
    }
    assert client.feedback("patient-view", {"feedback": [item]}).status_code == 404


# --- JWT (§Trusting CDS Clients) ---------------------------------------------------------------------------------


def _status(client: Client, url: str, token: str, body: Any) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    if body is None:
        return client.http.get(url, headers=headers).status_code
    return client.http.post(url, json=body, headers=headers).status_code


def endpoints(client: Client) -> list[tuple[str, Any]]:
    service = client.service("patient-view")["id"]
    item = {"card": card_for(client)["uuid"], "outcome": "overridden", "outcomeTimestamp": now_stamp()}
    return [
        (client.url(), None),
        (client.url(service), full(client, "patient-view", None)),
        (client.url(service, True), {"feedback": [item]}),
    ]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS384 JWT signed by hand (PyJWT refuses public-key-looking HMAC secrets, an attacker does not)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha384).digest()
    return f"{signing_input}.{_b64(signature)}"


def test_jwt_required_claims_and_header(client: Client, fhir: LoopbackFhir) -> None:
    """JWT payload iss, aud, exp, iat, jti REQUIRED; header alg (ES384/RS384; never none or HS*) and kid
    REQUIRED. Each failure -> 401 on every endpoint, with no detail."""
    issuer = client.issuer
    now = int(time.time())
    for url, body in endpoints(client):
        kid = issuer.kid()
        bad = {
            "no iss": issuer.token(url, iss=None),
            "no aud": issuer.token(None),  # type: ignore[arg-type]
            "no exp": issuer.token(url, exp=None),
            "no iat": issuer.token(url, iat=None),
            "no jti": issuer.token(url, jti=None),
            "empty jti": issuer.token(url, jti=""),
            "no kid": jwt.encode(
                {"iss": issuer.issuer, "aud": url, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())},
                issuer.keys["ES384"][1],
                algorithm="ES384",
                headers={"typ": "JWT"},
            ),
            "wrong kid": issuer.token(url, headers={"kid": "nope"}),
            "RS384 key under the ES384 kid": issuer.token(url, alg="RS384", headers={"kid": kid}),
            "alg none": unsigned_token(
                {"iss": issuer.issuer, "aud": url, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())},
                {"kid": kid, "typ": "JWT"},
            ),
            "HS384 keyed with the public JWKS (alg confusion)": hmac_token(
                {"alg": "HS384", "typ": "JWT", "kid": kid},
                {"iss": issuer.issuer, "aud": url, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())},
                json.dumps(issuer.jwks).encode(),
            ),
            "iat in the future": issuer.token(url, iat=now + 600, exp=now + 900),
            "expired": issuer.token(url, iat=now - 400, exp=now - 100),
            "exp as a string": issuer.token(url, exp=str(now + 60)),
            "aud with a trailing slash": issuer.token(url + "/"),
            "aud of another host": issuer.token(url.replace("127.0.0.1", "localhost")),
            "aud of https": issuer.token(url.replace("http://", "https://")),
            "iss with a trailing slash": issuer.token(url, iss=issuer.issuer + "/"),
            "nbf in the future": issuer.token(url, nbf=now + 600),
            "typ not JWT": issuer.token(url, headers={"typ": "at+jwt"}),
            "crit header": issuer.token(url, headers={"crit": ["exp"]}),
            "lifetime over an hour": issuer.token(url, exp=now + 7200),
        }
        for case, token in bad.items():
            assert _status(client, url, token, body) == 401, (url, case)
    assert fhir.requests == []


def test_jwt_valid_forms(client: Client, fhir: LoopbackFhir) -> None:
    """aud as an array holding the URL; extra claims (sub, nbf, tenant) and a jku header tolerated; scheme
    name ``bearer`` case-insensitive (RFC 6750)."""
    for url, body in endpoints(client):
        for token in (
            client.issuer.token([url, "https://other.example/cds-services"]),
            client.issuer.token(url, sub="ehr", tenant="t1", nbf=int(time.time()) - 5),
            client.issuer.token(url, alg="RS384", headers={"jku": "https://ehr.example.org/jwks.json"}),
            client.issuer.token(url, headers={"typ": None}),  # typ is REQUIRED of the client; tolerated if absent
            client.issuer.token(url, exp=time.time() + 60.5),  # NumericDate may be fractional
        ):
            assert _status(client, url, token, body) == 200, url
        token = client.issuer.token(url)
        headers = {"Authorization": f"bearer {token}"}
        response = client.http.request("GET" if body is None else "POST", url, json=body, headers=headers)
        assert response.status_code == 200


def test_jwt_replay_and_cross_endpoint_reuse(client: Client, fhir: LoopbackFhir) -> None:
    """jti is a nonce: a token is accepted once; a token for one endpoint is refused on another (aud)."""
    (discovery, _), (service, body), (feedback, item) = endpoints(client)
    token = client.issuer.token(service)
    assert _status(client, service, token, body) == 200
    assert _status(client, service, token, {**body, "hookInstance": str(uuid.uuid4())}) == 401
    assert _status(client, feedback, client.issuer.token(service), item) == 401
    assert _status(client, discovery, client.issuer.token(feedback), None) == 401
    response = client.http.post(service, json=body, headers={"x-no-auth": "1"})
    assert response.status_code == 401 and response.headers["www-authenticate"].lower().startswith("bearer")
    assert b"jti" not in response.content and b"replay" not in response.content


def test_card_handled_before_the_stream_caught_up_stays_handled(client: Client, fhir: LoopbackFhir) -> None:
    """A request-only card overridden (or accepted) by the clinician, then the stream opens its alert for the
    same episode: the guidance is not shown again under a new uuid, and the alert carries the clinician's
    outcome (so the pharmacist sees it)."""
    for outcome in ("overridden", "accepted"):
        patient = patient_id()
        resources = scenario(HYPOK, patient)
        body = request("patient-view", patient, prefetch(client, "patient-view", resources, patient))
        (card,) = client.cards("patient-view", body)
        item: dict[str, Any] = {"card": card["uuid"], "outcome": outcome, "outcomeTimestamp": now_stamp()}
        if outcome == "accepted":
            item["acceptedSuggestions"] = [{"id": card["suggestions"][0]["uuid"]}]
        assert client.feedback("patient-view", {"feedback": [item]}).status_code == 200
        client.stream(resources)
        assert client.store is not None
        (alert,) = client.store.alerts_for_patient(patient, open_only=True)
        again = client.cards("patient-view", {**body, "hookInstance": str(uuid.uuid4())})
        assert again == [], (outcome, again)
        alert = client.store.find_alert(alert["id"])
        assert alert is not None and alert["status"] == outcome, (outcome, alert and alert["status"])


@pytest.mark.parametrize("call_between", [False, True])
def test_card_uuid_of_an_open_episode_survives_the_stream_catching_up(
    client: Client, fhir: LoopbackFhir, call_between: bool
) -> None:
    """Card uuid stability for one episode: the EHR showed a request-only card; after the stream opens the alert
    for the same episode, the card keeps its uuid (and suggestion uuids) and feedback on it reaches the alert."""
    patient = patient_id()
    resources = scenario(HYPOK, patient)
    body = request("patient-view", patient, prefetch(client, "patient-view", resources, patient))
    (card,) = client.cards("patient-view", body)
    client.stream(resources)
    assert client.store is not None
    (alert,) = client.store.alerts_for_patient(patient, open_only=True)
    if call_between:
        (again,) = client.cards("patient-view", {**body, "hookInstance": str(uuid.uuid4())})
        assert again["uuid"] == card["uuid"] and again["suggestions"] == card["suggestions"]
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": now_stamp()}
    response = client.feedback("patient-view", {"feedback": [item]})
    assert response.status_code == 200 and response.json()["feedback"][0]["alertStatus"] == "overridden"
    stored = client.store.find_alert(alert["id"])
    assert stored is not None and stored["status"] == "overridden"
    assert [h["action"] for h in stored["history"]].count("override") == 1
    assert client.cards("patient-view", {**body, "hookInstance": str(uuid.uuid4())}) == []
    assert client.feedback("patient-view", {"feedback": [item]}).status_code == 200  # a retry changes nothing
    assert [h["action"] for h in client.store.find_alert(alert["id"])["history"]].count("override") == 1


HOSTILE = "KCl <img src=x onerror=alert(1)> [click](https://evil.example) *x*\n# big"


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_card_detail_does_not_pass_markup_from_the_ehr_data(client: Client, fhir: LoopbackFhir, hook: str) -> None:
    """§Card detail is GitHub-flavoured Markdown that clients render (the sandbox with raw HTML on): free text of
    the EHR's data (a draft order's medication text) shows as text, never as HTML, links or structure."""
    patient = patient_id()
    order = draft_kcl(patient)
    order["medicationCodeableConcept"] = {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "8591", "display": HOSTILE}],
        "text": HOSTILE,
    }
    body = request(hook, patient, prefetch(client, hook, scenario(HYPOK, patient), patient), orders=[order])
    (card,) = client.cards(hook, body)
    html = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(card["detail"])
    visible = html.replace("\u2060", "")  # word joiners keep the URL from being autolinked by GFM renderers
    assert "KCl &lt;img src=x onerror=alert(1)&gt; [click](https://evil.example) *x* # big" in visible  # as text
    assert "<img" not in html and "<a " not in html and "<em>x" not in html and "<h1>" not in html


LONG_ID = "ez067mnwOAKP5z1.YJwRAsd9gCwdOzQ8wSrsM04QFoz882hxQZKBulF4smVj2SxHWfesiTZ1qsgBez8Rdeb2GpbWYuU.L0KkOq"


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_draft_orders_with_over_long_ids_as_in_the_spec_example_count(
    client: Client, fhir: LoopbackFhir, hook: str
) -> None:
    """The spec's own order-sign example (HL7 index, EHR-issued ids) has draft order ids longer than FHIR's 64
    characters: such a draft magnesium order still satisfies the "no Mg" rule (no false card)."""
    patient = patient_id()
    mg = {
        "resourceType": "ServiceRequest",
        "id": LONG_ID,
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2601-3"}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    body = request(hook, patient, prefetch(client, hook, scenario(HYPOK, patient), patient), orders=[mg])
    assert client.cards(hook, body) == []


def spec_contexts() -> list[tuple[str, str, dict[str, Any]]]:
    """(file, hook, context) of every hook-context example of the spec and the hook pages that is a complete
    context of one of our hooks."""
    out = []
    for path in sorted(SPEC_EXAMPLES.glob("*context*.json")):
        data = json.loads(path.read_text())
        context = data.get("context", data)
        named = re.search(r"docs_hooks_([a-z-]+)__", path.name)
        if "selections" in context and "draftOrders" in context:
            hook = "order-select"
        elif "draftOrders" in context:
            hook = "order-sign"
        else:
            hook = "patient-view"
        if (named and named.group(1) != hook) or not {"userId", "patientId"} <= set(context):
            continue
        out.append((path.name, hook, context))
    return out


def test_spec_hook_context_examples_answer_schema_valid_cards(client: Client, fhir: LoopbackFhir) -> None:
    """Each hook-context example of the spec (Epic-style long ids, STU3/DSTU2 draft orders, NutritionOrders,
    PractitionerRole users) as a call with our prefetch keys present: 200 and a valid ServiceResponse."""
    contexts = spec_contexts()
    assert {hook for _, hook, _ in contexts} == {"patient-view", "order-select", "order-sign"}
    for name, hook, context in contexts:
        body = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
        body["prefetch"] = dict.fromkeys(client.service(hook)["prefetch"])
        response = client.call(hook, body)
        assert response.status_code == 200, (name, response.text)
        validate(response.json(), "ServiceResponse")
        check_cards(response.json()["cards"])
    assert fhir.requests == []
