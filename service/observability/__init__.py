"""Operations for the HTTP API: JSON logs, request ids, metrics (``GET /metrics``), readiness.

Refused tokens reach ``record_auth_failure(scheme, reason)`` through ``service.security.failures.on_failure``.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from service.observability.health import readiness
from service.observability.metrics import record_auth_failure, record_event
from service.observability.middleware import ObservabilityMiddleware
from workers.observability.logging import configure_logging

__all__ = ["install", "readiness", "readiness_response", "record_auth_failure", "record_event"]


def readiness_response(*, workers: bool = True) -> JSONResponse:
    """``/readyz``: 200 with the checks when ready, else 503 with the reasons."""
    ready, body = readiness(workers=workers)
    return JSONResponse(body, 200 if ready else 503)


def install(app: FastAPI) -> None:
    """Configure logging, wrap ``app`` in the observability middleware and add ``GET /metrics``."""
    from fastapi import Depends

    from service.observability.metrics import exposition, register_pipeline_metrics
    from service.security.access import metrics_reader
    from service.security.failures import on_failure

    configure_logging()
    register_pipeline_metrics()
    on_failure(record_auth_failure)  # every refused token -> ehr_alerts_auth_failures_total{scheme, reason}
    app.add_middleware(ObservabilityMiddleware)

    @app.get("/metrics", tags=["operations"], include_in_schema=True, dependencies=[Depends(metrics_reader)])
    def prometheus_metrics() -> Response:
        """Prometheus metrics: this API process, plus the pipeline's cluster-wide metrics from Redis. Needs
        ``Authorization: Bearer <EHR_ALERTS_METRICS_TOKEN>`` (open in the dev profile when no token is set)."""
        body, content_type = exposition()
        return Response(body, media_type=content_type)
