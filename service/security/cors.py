"""CORS for browser-based CDS clients (e.g. the CDS Hooks sandbox): an allow-list of origins, nothing else."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from config.settings import Settings, get_settings

ALLOWED_METHODS = ["GET", "POST", "OPTIONS"]
ALLOWED_HEADERS = ["Authorization", "Content-Type"]


def install_cors(app: FastAPI, settings: Settings | None = None) -> bool:
    """Add the CORS middleware when ``cors_origins`` lists any origin; True when installed.

    Preflights from other origins get 400 without ``Access-Control-Allow-Origin``. Credentials (cookies) are
    not allowed cross-origin: CDS clients send their JWT in the Authorization header.
    """
    settings = settings or get_settings()
    if not settings.cors_origins:
        return False
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=ALLOWED_METHODS,
        allow_headers=ALLOWED_HEADERS,
        allow_credentials=False,
        max_age=600,
    )
    return True
