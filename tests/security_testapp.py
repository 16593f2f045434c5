"""A tiny FastAPI app wired with the real security dependencies, and a helper to configure the settings
for one test (environment + cache resets)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI

from config.settings import get_settings
from service.security import CdsClient, Principal, cds_client, install_cors, require_role
from service.security.jwks import clear_key_sets

SECURITY_ENV_PREFIXES = ("EHR_ALERTS_",)


def configure(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Replace every EHR_ALERTS_* variable by ``env`` and drop cached settings and key sets."""
    import os

    for name in list(os.environ):
        if name.startswith(SECURITY_ENV_PREFIXES) and name not in env:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    clear_key_sets()


@contextmanager
def settings_reset() -> Iterator[None]:
    """Clear cached settings/key sets before and after (use around a test that calls :func:`configure`)."""
    get_settings.cache_clear()
    clear_key_sets()
    try:
        yield
    finally:
        get_settings.cache_clear()
        clear_key_sets()


def make_app() -> FastAPI:
    """Endpoints shaped like the real ones, each returning who was let in."""
    app = FastAPI()
    install_cors(app)

    def client_json(client: CdsClient) -> dict[str, Any]:
        return {"issuer": client.issuer, "subject": client.subject, "tenant": client.tenant, "actor": client.actor}

    @app.get("/cds-services")
    async def discovery(client: Annotated[CdsClient, Depends(cds_client)]) -> dict[str, Any]:
        return {"services": [], **client_json(client)}

    @app.post("/cds-services/{service_id}")
    async def service(service_id: str, client: Annotated[CdsClient, Depends(cds_client)]) -> dict[str, Any]:
        return {"cards": [], **client_json(client)}

    @app.post("/cds-services/{service_id}/feedback")
    async def feedback(service_id: str, client: Annotated[CdsClient, Depends(cds_client)]) -> dict[str, Any]:
        return client_json(client)

    def user_json(user: Principal) -> dict[str, Any]:
        return {"subject": user.subject, "name": user.name, "roles": sorted(user.roles), "actor": user.actor}

    @app.get("/review/alerts")
    async def worklist(user: Annotated[Principal, Depends(require_role("viewer"))]) -> dict[str, Any]:
        return user_json(user)

    @app.post("/review/alerts/{alert_id}/acknowledge")
    async def acknowledge(
        alert_id: str, user: Annotated[Principal, Depends(require_role("pharmacist"))]
    ) -> dict[str, Any]:
        return user_json(user)

    @app.get("/review/analytics")
    async def analytics(user: Annotated[Principal, Depends(require_role("admin"))]) -> dict[str, Any]:
        return user_json(user)

    return app
