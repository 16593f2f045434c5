"""Issue 15: no Redis call of a CDS Hooks call or feedback blocks the event loop. The JWT replay check (jti) uses
the asyncio client (``service.aredis``); the alert store and card index reads and writes run with the
normalisation and the rule engine on a thread of the bounded ``cds`` lane (``service/offload.py``). A full
lane answers 503 ``throttled`` with Retry-After. Through the ASGI app with real client JWTs (embedded Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from cds_support import HYPOK, SERVICE, hook_request, prefetch_for, scenario, signed_client
from fastapi.testclient import TestClient

import service.cds.router as cds_router
from service.offload import get_lane, reset_lanes

PATH = f"/cds-services/{SERVICE['patient-view']}"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    reset_lanes()  # rebuilt from the test settings on first use
    with signed_client(tmp_path_factory.mktemp("issuer")) as c:
        yield c
    reset_lanes()


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def sync_redis_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool, int]]:
    """(command, made on the event loop thread, cds requests in flight) of every synchronous Redis call."""
    calls: list[tuple[str, bool, int]] = []
    real_command = redis.Redis.execute_command
    real_pipeline = redis.client.Pipeline.execute

    def command(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((str(args[0]), _on_loop(), get_lane("cds").in_flight))
        return real_command(self, *args, **kwargs)

    def pipeline(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(("pipeline", _on_loop(), get_lane("cds").in_flight))
        return real_pipeline(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "execute_command", command)
    monkeypatch.setattr(redis.client.Pipeline, "execute", pipeline)
    return calls


RUN = uuid.uuid4().hex[:8]  # patients of this run: a shared REDIS_URL keeps earlier runs' feedback and alerts


def _call(name: str) -> dict[str, Any]:
    patient = f"{name}-{RUN}"
    return hook_request("patient-view", patient, prefetch_for(scenario(HYPOK, patient), patient))


def test_a_call_and_its_feedback_make_no_blocking_redis_call_on_the_event_loop(
    client: TestClient, sync_redis_calls: list[tuple[str, bool, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    async_calls: list[str] = []
    from service import aredis

    real = aredis.get_async_redis

    def counted() -> Any:
        async_calls.append("jti")
        return real()

    monkeypatch.setattr(aredis, "get_async_redis", counted)
    response = client.post(PATH, json=_call("offload-1"))
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert [c["indicator"] for c in cards] == ["info"]
    item = {"card": cards[0]["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-12-05T18:00:00Z"}
    answer = client.post(f"{PATH}/feedback", json={"feedback": [item]})
    assert answer.status_code == 200, answer.text
    assert async_calls == ["jti", "jti"]  # the replay check of both requests, with the asyncio client
    assert sync_redis_calls, "the card index and the alert store are read and written"
    blocking = [name for name, on_loop, _ in sync_redis_calls if on_loop]
    assert blocking == [], f"synchronous Redis calls on the event loop: {blocking}"
    # every synchronous call is made while a request holds the cds lane (the audit middleware's own write runs
    # on a thread of its own after the answer; it is no part of the call)
    assert any(in_flight >= 1 for _, _, in_flight in sync_redis_calls)


def test_the_cards_and_the_feedback_are_worked_out_on_a_cds_lane_thread(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    where: list[tuple[str, bool, int]] = []
    real_cards, real_apply = cds_router._cards_for, cds_router.apply_item

    def cards(*args: Any) -> Any:
        where.append(("cards", _on_loop(), get_lane("cds").in_flight))
        return real_cards(*args)

    def apply(*args: Any) -> Any:
        where.append(("feedback", _on_loop(), get_lane("cds").in_flight))
        return real_apply(*args)

    monkeypatch.setattr(cds_router, "_cards_for", cards)
    monkeypatch.setattr(cds_router, "apply_item", apply)
    response = client.post(PATH, json=_call("offload-2"))
    assert response.status_code == 200, response.text
    item = {
        "card": response.json()["cards"][0]["uuid"],
        "outcome": "overridden",
        "outcomeTimestamp": "2026-12-05T18:00:00Z",
    }
    assert client.post(f"{PATH}/feedback", json={"feedback": [item]}).status_code == 200
    assert where == [("cards", False, 1), ("feedback", False, 1)]


def test_a_full_cds_lane_answers_503_throttled_with_retry_after(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    lane = get_lane("cds")
    monkeypatch.setattr(lane, "admitted", 0)
    item = {"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-12-05T18:00:00Z"}
    for response in (
        client.post(PATH, json=_call("offload-3")),
        client.post(f"{PATH}/feedback", json={"feedback": [item]}),
    ):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "2"
        body = response.json()
        assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "throttled"
