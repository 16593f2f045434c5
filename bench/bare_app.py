"""The floor for ``bench_cds.py --cold-chart``: a bare FastAPI POST that reads and parses the same JSON body as a
CDS Hooks call and answers an empty cards list (no authentication, no work)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

app = FastAPI()


@app.post("/cds-services/{service_id}")
async def call(service_id: str, request: Request) -> dict[str, Any]:
    """Parse the body (like any JSON endpoint) and answer no cards."""
    body = await request.json()
    return {"cards": [], "keys": len(body.get("prefetch") or {})}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive."""
    return {"status": "ok"}
