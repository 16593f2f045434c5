"""Pharmacist review: worklist JSON API (``/api/review``), server-rendered page (``/review``), the
data-problems queue, analytics and audit export. ``install(app)`` adds the routers, the static files and the
error handlers. Patient identity comes through one seam, :mod:`service.review.patients`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from service.ingest import error_outcome
from service.review import api, pages
from service.review.core import ReviewError


async def _review_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ReviewError)
    if request.url.path.startswith("/api/"):
        return JSONResponse(error_outcome(exc.message, exc.expression, exc.code), exc.status)
    return pages.templates.TemplateResponse(request, "forbidden.html", {"message": exc.message}, exc.status)


def install(app: FastAPI) -> None:
    """Mount the review API, page and static files on ``app``."""
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/review/static", StaticFiles(directory=Path(__file__).parent / "static"), name="review-static")
    app.add_exception_handler(ReviewError, _review_error)
    app.add_exception_handler(pages.LoginRequired, pages.login_required_handler)
    app.add_exception_handler(pages.PageForbidden, pages.forbidden_handler)
