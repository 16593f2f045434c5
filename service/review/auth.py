"""Who may do what on the review API and page: the one place the review code binds to ``service.security``.

``viewer`` reads, ``pharmacist`` also acts, ``admin`` also gets analytics and exports (the security module
makes admin imply pharmacist and viewer). The page reuses the same dependencies through ``call`` and turns
their 401 into a redirect to the login form.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request

from config.settings import get_settings
from service.security import (
    SESSION_COOKIE,
    AuthFailure,
    Principal,
    clear_session_cookie,
    require_role,
    set_session_cookie,
    verify_review_token,
)

CSRF_COOKIE = "ehr_alerts_csrf"

#: read the worklist, details and page (every role)
reader = require_role("viewer", "pharmacist", "admin")
#: act on alerts
pharmacist = require_role("pharmacist")
#: analytics and audit exports
admin = require_role("admin")


async def call(dependency: Callable[..., Awaitable[Principal]], request: Request) -> Principal:
    """Run a ``require_role`` dependency by hand (the page catches its 401/403). Its other parameters are the
    OpenAPI security-scheme declarations, which it does not read: passed as None."""
    arguments: dict[str, Any] = {}
    for name, parameter in inspect.signature(dependency).parameters.items():
        arguments[name] = request if parameter.annotation in (Request, "Request") or name == "request" else None
    return await dependency(**arguments)


def same_origin(request: Request) -> bool:
    """For forms that carry no session yet (the login form): the browser's ``Origin`` must be this service's
    origin (``EHR_ALERTS_PUBLIC_BASE_URL`` when set, else the request's), and a browser that names the request
    cross-site (``Sec-Fetch-Site``) is refused even without an Origin. Same rule as the security module
    applies to cookie-authenticated writes."""
    origin = request.headers.get("origin")
    if origin is None:
        return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    base = get_settings().public_base_url
    if base:
        parts = urlsplit(base)
        expected = f"{parts.scheme}://{parts.netloc}"
    else:
        expected = f"{request.url.scheme}://{request.url.netloc}"
    return origin == expected


__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "AuthFailure",
    "Principal",
    "admin",
    "call",
    "clear_session_cookie",
    "pharmacist",
    "reader",
    "same_origin",
    "set_session_cookie",
    "verify_review_token",
]
