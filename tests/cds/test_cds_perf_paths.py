"""What the CDS latency work changed must not change behaviour: the body is parsed once (the observability
middleware hands its parse to the endpoint) yet size, content-type and JSON errors answer as before; the
start-up heap freeze is switchable. Through the ASGI app with real client JWTs (embedded Redis)."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from cds_support import HYPOK, SERVICE, hook_request, prefetch_for, scenario, signed_client
from fastapi.testclient import TestClient

from config.process import freeze_startup_heap
from config.settings import get_settings
from workers.observability import context

PATH = f"/cds-services/{SERVICE['patient-view']}"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with signed_client(tmp_path_factory.mktemp("issuer"), EHR_ALERTS_MAX_BODY_BYTES="20000") as c:
        yield c


def _body(patient: str, **extra: Any) -> dict[str, Any]:
    return hook_request("patient-view", patient, prefetch_for(scenario(HYPOK, patient), patient), **extra)


def test_the_body_is_parsed_once_per_call(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.dumps(_body("once1")).encode()
    parses = []
    real = orjson.loads

    def counting(data: Any) -> Any:
        if bytes(data) == raw:
            parses.append(1)
        return real(data)

    monkeypatch.setattr(orjson, "loads", counting)
    response = client.post(PATH, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert [c["indicator"] for c in response.json()["cards"]] == ["info"]
    assert len(parses) == 1


def test_the_hook_instance_still_reaches_the_log_context(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    body = _body("once2")
    seen: list[dict[str, str]] = []
    real = logging.Logger.info

    def spy(self: logging.Logger, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg == "cds call answered":
            seen.append(context.current())
        real(self, msg, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "info", spy)
    assert client.post(PATH, json=body).status_code == 200
    assert seen and seen[-1].get("hook_instance") == body["hookInstance"]


def test_a_body_over_the_limit_is_413_even_when_the_middleware_parsed_it(client: TestClient) -> None:
    body = _body("once3", extension={"padding": "x" * 30_000})  # 30 kB: peeked (< 1 MB), over the 20 kB limit
    response = client.post(PATH, json=body)
    assert response.status_code == 413, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


def test_invalid_json_and_wrong_content_type_answer_as_before(client: TestClient) -> None:
    response = client.post(PATH, content=b'{"hook": "patient-view",', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["issue"][0]["code"] == "structure"
    response = client.post(PATH, content=json.dumps(_body("once4")).encode(), headers={"content-type": "text/plain"})
    assert response.status_code == 415


def test_the_start_up_heap_freeze_is_switchable(monkeypatch: pytest.MonkeyPatch) -> None:
    thresholds = gc.get_threshold()
    try:
        monkeypatch.setenv("EHR_ALERTS_GC_YOUNG_THRESHOLD", "0")
        monkeypatch.setenv("EHR_ALERTS_GC_FREEZE_AT_START", "false")
        get_settings.cache_clear()
        gc.unfreeze()
        assert freeze_startup_heap() == 0
        assert gc.get_freeze_count() == 0
        monkeypatch.setenv("EHR_ALERTS_GC_FREEZE_AT_START", "true")
        get_settings.cache_clear()
        frozen = freeze_startup_heap()
        assert frozen > 1000
        assert gc.get_freeze_count() == frozen
        assert gc.get_threshold() == thresholds  # 0 keeps the interpreter's thresholds
        monkeypatch.setenv("EHR_ALERTS_GC_YOUNG_THRESHOLD", "12345")
        get_settings.cache_clear()
        freeze_startup_heap()
        assert gc.get_threshold() == (12345, *thresholds[1:])
    finally:
        gc.set_threshold(*thresholds)
        get_settings.cache_clear()
