"""CORS for browser-based CDS clients (e.g. the CDS Hooks sandbox): an allow-list of origins, nothing else."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from config.settings import SANDBOX_ISSUER, Settings, get_settings

ALLOWED_METHODS = ["GET", "POST", "OPTIONS"]
ALLOWED_HEADERS = ["Authorization", "Content-Type"]


def allowed_origins(settings: Settings) -> list[str]:
    """``cors_origins``, plus the public CDS Hooks sandbox in the dev profile (it is trusted there anyway)."""
    origins = list(settings.cors_origins)
    if settings.profile == "dev" and SANDBOX_ISSUER not in origins and "*" not in origins:
        origins.append(SANDBOX_ISSUER)  # the sandbox's issuer is its origin: https://sandbox.cds-hooks.org
    return origins


def install_cors(app: FastAPI, settings: Settings | None = None) -> bool:
    """Add the CORS middleware when any origin is allowed (:func:`allowed_origins`); True when installed.

    Preflights from other origins get 400 without ``Access-Control-Allow-Origin``. Credentials (cookies) are
    not allowed cross-origin: CDS clients send their JWT in the Authorization header.
    """
    settings = settings or get_settings()
    origins = allowed_origins(settings)
    if not origins:
        return False
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=ALLOWED_METHODS,
        allow_headers=ALLOWED_HEADERS,
        allow_credentials=False,
        max_age=600,
    )
    return True
