"""Logs, metrics and readiness, in process (fakeredis; the subprocess tests are in tests/integration)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import fakeredis
import pytest
import redis
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from prometheus_client.core import Metric

from config.settings import Settings, get_settings
from service.observability import health, metrics
from service.observability.middleware import ObservabilityMiddleware
from workers.observability import context, heartbeat
from workers.observability.logging import JsonFormatter, RedactionFilter, patient_ref, redact
from workers.observability.metrics import PipelineCollector, oldest_enqueued_at, record_latency
from workers.state import keys

JWT = "eyJhbGciOiJFUzM4NCJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    monkeypatch.setenv("EHR_ALERTS_KEY_PREFIX", "obs")
    get_settings.cache_clear()
    yield fakeredis.FakeRedis(decode_responses=True)
    monkeypatch.undo()
    get_settings.cache_clear()


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("ehr_alerts.test", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


# --- logs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"Authorization: Bearer {JWT}", JWT),
        (f"token {JWT} seen", JWT),
        ("bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
        ('{"access_token": "opaque-token-123"}', "opaque-token-123"),
        ("client_secret=s3cr3t-value", "s3cr3t-value"),
        ("redis://:hunter2@redis:6379/0", "hunter2"),
        ("1 validation error\n  input_value={'patient': 'ex-alpha', 'value': 2.9}, input_type=dict]", "ex-alpha"),
    ],
)
def test_redaction_masks_tokens(text: str, secret: str):
    assert secret not in redact(text)
    assert "REDACTED" in redact(text)


def test_redaction_filter_freezes_the_rendered_message():
    record = _record("got %s", f"Bearer {JWT}")
    RedactionFilter().filter(record)
    assert record.args is None and JWT not in record.getMessage()


def test_json_formatter_keeps_whitelisted_fields_and_drops_others():
    record = _record("batch done", events=3, data={"args": [{"patient": "ex-alpha"}]}, name_of_patient="Alice")
    with context.bound(task_id="t-1", request_id="r-1"):
        line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["events"] == 3 and entry["task_id"] == "t-1" and entry["request_id"] == "r-1"
    assert "data" not in entry and "name_of_patient" not in entry and "ex-alpha" not in line
    assert entry["level"] == "INFO" and entry["logger"] == "ehr_alerts.test" and entry["message"] == "batch done"


def test_json_formatter_redacts_exceptions():
    try:
        raise ValueError(f"bad header Bearer {JWT}")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError" in entry["exception"] and JWT not in entry["exception"]


def test_patient_ref_is_keyed_and_stable():
    one = Settings(log_hash_key="key-one")
    two = Settings(log_hash_key="key-two")
    assert patient_ref("ex-alpha", one) == patient_ref("ex-alpha", one)
    assert patient_ref("ex-alpha", one) != patient_ref("ex-alpha", two)
    assert patient_ref("ex-alpha", one) != patient_ref("ex-bravo", one)
    assert patient_ref("ex-alpha", one).startswith("pt_") and "alpha" not in patient_ref("ex-alpha", one)


def test_patient_ref_without_key_uses_a_random_process_key(caplog: pytest.LogCaptureFixture):
    import workers.observability.logging as module

    module._process_key = None
    with caplog.at_level(logging.WARNING):
        first = patient_ref("ex-alpha", Settings())
    assert patient_ref("ex-alpha", Settings()) == first
    assert "EHR_ALERTS_LOG_HASH_KEY is not set" in caplog.text


def test_context_rejects_unknown_fields():
    with pytest.raises(ValueError, match="patient_name"):
        context.bind(patient_name="Alice")


# --- HTTP middleware ------------------------------------------------------------------------------------


def _app() -> TestClient:
    app = FastAPI()
    app.add_middleware(ObservabilityMiddleware)
    seen: dict[str, str | None] = {}

    @app.get("/cds-services")
    def discovery() -> dict[str, list[str]]:
        return {"services": []}

    @app.post("/cds-services/{service_id}")
    async def call(service_id: str, body: dict) -> dict[str, object]:
        if service_id != "mg-k":
            raise HTTPException(404)
        seen.update(context.current())
        return {"cards": [], "echo": body.get("hookInstance")}

    @app.get("/patients/{patient_id}")
    def patient(patient_id: str) -> dict[str, str]:
        return {"id": patient_id}

    client = TestClient(app)
    client.seen = seen  # type: ignore[attr-defined]
    return client


def _sample(metric: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(metric, labels)
    return value or 0.0


def test_request_id_is_taken_or_made_and_echoed():
    client = _app()
    assert client.get("/cds-services", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/cds-services", headers={"X-Request-ID": "not an id <script>"}).headers["x-request-id"]
    assert len(made) == 32 and "script" not in made


def test_cds_latency_by_service_and_hook_instance_in_context():
    client = _app()
    before = _sample(
        "ehr_alerts_cds_hooks_request_duration_seconds_count", service="mg-k", endpoint="service", status="200"
    )
    body = {"hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "hook": "patient-view"}
    response = client.post("/cds-services/mg-k", json=body)
    assert response.status_code == 200 and response.json()["echo"] == body["hookInstance"]  # body replayed intact
    assert client.seen["hook_instance"] == body["hookInstance"]  # type: ignore[attr-defined]
    after = _sample(
        "ehr_alerts_cds_hooks_request_duration_seconds_count", service="mg-k", endpoint="service", status="200"
    )
    assert after == before + 1
    # an unknown id never becomes a label (unbounded cardinality from clients)
    for i in range(3):
        assert client.post(f"/cds-services/made-up-{i}", json={}).status_code == 404
    assert (
        _sample(
            "ehr_alerts_cds_hooks_request_duration_seconds_count", service="made-up-0", endpoint="service", status="404"
        )
        == 0
    )
    assert (
        _sample(
            "ehr_alerts_cds_hooks_request_duration_seconds_count", service="unknown", endpoint="service", status="404"
        )
        >= 3
    )
    assert (
        _sample(
            "ehr_alerts_cds_hooks_request_duration_seconds_count",
            service="discovery",
            endpoint="discovery",
            status="200",
        )
        >= 0
    )


def test_http_metrics_and_log_use_the_route_template(caplog: pytest.LogCaptureFixture):
    client = _app()
    with caplog.at_level(logging.INFO, logger="ehr_alerts.http"):
        client.get("/patients/ex-secret-id")
    assert "ex-secret-id" not in caplog.text and "/patients/{patient_id}" in caplog.text
    assert (
        _sample(
            "ehr_alerts_http_request_duration_seconds_count", method="GET", route="/patients/{patient_id}", status="200"
        )
        >= 1
    )
    exposition, _ = metrics.exposition()
    assert b"ex-secret-id" not in exposition


def test_security_refusals_reach_the_auth_failure_metric():
    import service.app  # noqa: F401 - installs the listener
    from service.security.failures import record_failure

    before = _sample("ehr_alerts_auth_failures_total", scheme="review", reason="signature")
    record_failure("review", "signature")
    assert _sample("ehr_alerts_auth_failures_total", scheme="review", reason="signature") == before + 1


def test_auth_failures_by_scheme_and_bounded_reason():
    before = _sample("ehr_alerts_auth_failures_total", scheme="cds", reason="expired")
    metrics.record_auth_failure("cds", "expired")
    metrics.record_auth_failure("review", f"token {JWT} is bad")
    assert _sample("ehr_alerts_auth_failures_total", scheme="cds", reason="expired") == before + 1
    assert _sample("ehr_alerts_auth_failures_total", scheme="review", reason="other") >= 1
    assert JWT.encode() not in metrics.exposition()[0]


# --- pipeline metrics from Redis ------------------------------------------------------------------------


def _families(client: redis.Redis) -> dict[str, Metric]:
    return {m.name: m for m in PipelineCollector(lambda: client).collect()}


def _value(family: Metric, suffix: str = "", **labels: str) -> float:
    return sum(
        s.value
        for s in family.samples
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_pipeline_collector_reads_counters_latency_queue_heartbeats_and_gaps(fake: fakeredis.FakeRedis):
    fake.hset(
        keys.counters(),
        mapping={
            "events_stored": 5,
            "events_stored:Observation": 4,
            "events_stored:MedicationRequest": 1,
            "events_duplicate:Observation": 2,
            "decisions_fires:hypokalemia-without-magnesium": 3,
            "decisions_indeterminate:arrhythmia-with-low-magnesium": 1,
            "alerts_opened:hypokalemia-without-magnesium": 2,
            "alerts_resolved:hypokalemia-without-magnesium": 1,
            "events_dead_lettered": 1,
        },
    )
    record_latency(fake, 0.2, events=3)
    record_latency(fake, 42.0, events=1)
    fake.lpush("ehr-alerts", json.dumps({"headers": {"ehr_enqueued_at": time.time() - 30}}))  # oldest (tail)
    fake.lpush("ehr-alerts", json.dumps({"headers": {"ehr_enqueued_at": time.time()}}))
    heartbeat.beat(fake, "w1@host", None)
    heartbeat.beat(fake, "w2@host", None, now=time.time() - 3600)  # gone
    fake.hset("obs:subscriptions:gaps", "Subscription/a", 4)

    families = _families(fake)
    assert _value(families["ehr_alerts_redis_up"]) == 1
    events = families["ehr_alerts_worker_events"]
    assert _value(events, "_total", resource_type="Observation", status="stored") == 4
    assert _value(events, "_total", resource_type="Observation", status="duplicate") == 2
    assert _value(events, "_total", status="stored") == 5  # the unlabelled total is not double counted
    decisions = families["ehr_alerts_rule_decisions"]
    assert _value(decisions, "_total", rule="hypokalemia-without-magnesium", outcome="fires") == 3
    assert _value(decisions, "_total", outcome="indeterminate") == 1
    transitions = families["ehr_alerts_alert_transitions"]
    assert _value(transitions, "_total", kind="opened") == 2 and _value(transitions, "_total", kind="resolved") == 1
    assert _value(families["ehr_alerts_events_dead_lettered"], "_total") == 1
    latency = families["ehr_alerts_processing_latency_seconds"]
    assert _value(latency, "_bucket", le="0.25") == 3
    assert _value(latency, "_bucket", le="60.0") == 4 and _value(latency, "_bucket", le="+Inf") == 4
    assert _value(latency, "_count") == 4 and _value(latency, "_sum") == pytest.approx(42.6)
    assert _value(families["ehr_alerts_queue_depth"], queue="ehr-alerts") == 2
    assert 29 <= _value(families["ehr_alerts_queue_oldest_age_seconds"]) < 300
    assert _value(families["ehr_alerts_workers_alive"]) == 1
    assert _value(families["ehr_alerts_subscription_event_gaps"], "_total", subscription="Subscription/a") == 4


def test_oldest_age_tolerates_foreign_messages(fake: fakeredis.FakeRedis):
    assert oldest_enqueued_at(fake) is None
    fake.lpush("ehr-alerts", "not json")
    assert oldest_enqueued_at(fake) is None


def test_pipeline_collector_reports_redis_down():
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    families = _families(down)
    assert list(families) == ["ehr_alerts_redis_up"] and _value(families["ehr_alerts_redis_up"]) == 0


# --- heartbeats and readiness ---------------------------------------------------------------------------


def test_heartbeat_file_liveness(tmp_path: Path):
    path = tmp_path / "hb"
    alive, reason = heartbeat.file_alive(path, 60)
    assert not alive and "does not exist" in reason
    heartbeat.touch(path, time.time() - 120)
    alive, reason = heartbeat.file_alive(path, 60)
    assert not alive and "more than 60 s" in reason
    heartbeat.touch(path, time.time())
    assert heartbeat.file_alive(path, 60)[0]
    assert not heartbeat.file_alive(None, 60)[0]


def test_heartbeat_file_is_touched_even_when_redis_is_down(tmp_path: Path):
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    with pytest.raises(redis.ConnectionError):
        heartbeat.beat(down, "w1", tmp_path / "hb")
    assert heartbeat.file_alive(tmp_path / "hb", 60)[0]


def test_readiness_needs_a_recent_worker_heartbeat(fake: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REDIS_URL", "redis://stub:6379/0")
    monkeypatch.setenv("EHR_ALERTS_WORKER_HEARTBEAT_MAX_AGE", "30")
    get_settings.cache_clear()
    monkeypatch.setattr(health, "probe_client", lambda: fake)
    ready, body = health.readiness()
    assert not ready and body["reasons"] == ["workers: no worker heartbeat in the last 30 s"]
    heartbeat.beat(fake, "w1@host", None, now=time.time() - 31)
    assert not health.readiness()[0]
    heartbeat.beat(fake, "w1@host", None)
    ready, body = health.readiness()
    assert ready and body == {"status": "ready", "checks": {"redis": "ok", "rules": 7, "workers": 1}, "reasons": []}


def test_readiness_when_redis_is_unreachable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    monkeypatch.setattr(
        health, "probe_client", lambda: redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    )
    ready, body = health.readiness()
    get_settings.cache_clear()
    assert not ready and body["checks"]["redis"] == "unreachable"
    assert body["reasons"] == ["redis: unreachable (ConnectionError)", "workers: unknown (redis unreachable)"]


def test_readiness_when_the_rule_catalog_is_refused(fake: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch):
    import workers.pipeline

    def refused() -> None:
        raise RuntimeError("catalog/x.yaml: when: unknown input 'k'")

    monkeypatch.setattr(health, "probe_client", lambda: fake)
    monkeypatch.setattr(workers.pipeline, "get_catalog", refused)
    heartbeat.beat(fake, "w1@host", None)  # a worker is alive, whether or not REDIS_URL is set
    ready, body = health.readiness()
    assert not ready and body["checks"]["rules"] == 0
    assert body["reasons"] == ["rules: catalog not loaded (catalog/x.yaml: when: unknown input 'k')"]


def test_heartbeat_max_age_must_cover_two_beats():
    from config.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"EHR_ALERTS_WORKER_HEARTBEAT_MAX_AGE: .*twice"):
        load_settings(worker_heartbeat_interval=30, worker_heartbeat_max_age=45)
    assert load_settings(worker_heartbeat_interval=1, worker_heartbeat_max_age=3).worker_heartbeat_max_age == 3
    assert load_settings(worker_heartbeat_file="").worker_heartbeat_file is None
    assert load_settings(log_level="debug").log_level == "DEBUG"


def test_text_format_is_redacted_and_carries_the_ids():
    from workers.observability.logging import TextFormatter

    with context.bound(request_id="r-9"):
        line = TextFormatter().format(_record("refused %s", f"Bearer {JWT}"))
    assert "request_id=r-9" in line and JWT not in line and "refused Bearer [REDACTED]" in line


def test_configure_logging_routes_uvicorn_and_celery_through_one_handler(capsys: pytest.CaptureFixture[str]):
    from workers.observability.logging import configure_logging

    configure_logging(Settings(log_level="DEBUG", log_format="json"))
    configure_logging(Settings(log_level="DEBUG", log_format="json"))  # idempotent: one handler
    assert [h.get_name() for h in logging.getLogger().handlers].count("ehr-alerts") == 1
    assert logging.getLogger("celery").getEffectiveLevel() == logging.INFO  # never DEBUG (task arguments)
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING  # URLs with patient ids
    assert logging.getLogger("uvicorn.access").disabled
    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("celery.worker").debug("TaskPool: Apply args=({'patient': 'ex-alpha'},)")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    for handler in [h for h in logging.getLogger().handlers if h.get_name() == "ehr-alerts"]:
        logging.getLogger().removeHandler(handler)  # it writes to this test's captured stderr
    assert [e["message"] for e in lines] == ["Started server process"]


def test_outage_guard_touches_the_file_only_while_redis_is_down(tmp_path):
    import threading
    import time as clock

    from workers.observability.heartbeat import OutageGuard

    path = tmp_path / "hb"
    down = threading.Event()

    def ping() -> bool:
        if down.is_set():
            raise ConnectionError("redis down")
        return True

    guard = OutageGuard(path, 0.05, lambda: 0.0, ping)  # the main loop has not beaten for ages
    guard.start()
    try:
        clock.sleep(0.3)
        assert not path.exists()  # Redis answers: a silent main loop is a stuck worker, no beat
        down.set()
        clock.sleep(0.3)
        assert path.exists() and guard.covered >= 2  # the stall is the outage: the file stays fresh
    finally:
        guard.stop()
