"""The server-rendered review page ``/review``: login by token, worklist, detail panel, transition forms.

Works without JavaScript: the filter bar is a GET form, the detail panel is selected by a link, every
transition is a POST form answered with a redirect back (303). Forms authenticate by the HttpOnly,
SameSite=Strict session cookie and carry a per-session CSRF token (double submit: a random value in a
second HttpOnly cookie and in a hidden field, compared in constant time).
"""

from __future__ import annotations

import hmac
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, parse_qsl, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from config.settings import get_settings
from service.review import core
from service.review.auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    AuthFailure,
    Principal,
    admin,
    call,
    clear_session_cookie,
    pharmacist,
    reader,
    set_session_cookie,
    verify_review_token,
)
from service.review.trend import sparkline
from workers.pipeline import get_catalog
from workers.state import review_index as rq

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/review", include_in_schema=False)

FILTERS = ("status", "rule", "severity", "patient", "q", "opened_from", "opened_to", "sort", "cursor")
MAX_FORM_BYTES = 16384
SNOOZE_CHOICES = (1, 4, 8, 24, 72)
NOTICES = {
    "acknowledge": "Alert acknowledged.",
    "override": "Alert overridden.",
    "snooze": "Alert snoozed.",
    "resolve": "Alert resolved.",
    "reopen": "Alert reopened.",
}


class LoginRequired(Exception):
    """The page needs a (valid) session: answered with a redirect to the login form."""


class PageForbidden(Exception):
    """The session's roles do not allow this page action."""


def _page_guard(dependency: Any, forbidden: str | None, doc: str) -> Any:
    """A page dependency around an API role dependency: a missing or refused token sends the browser to the
    login form (LoginRequired); a missing role shows ``forbidden`` (the API's own message when None)."""

    async def guard(request: Request) -> Principal:
        try:
            return await call(dependency, request)
        except HTTPException as exc:
            if exc.status_code == 401:
                raise LoginRequired from exc
            raise PageForbidden(forbidden or str(exc.detail)) from exc

    guard.__doc__ = doc
    return guard


page_reader = _page_guard(reader, None, "``reader`` for pages.")
page_pharmacist = _page_guard(pharmacist, "only pharmacists may act on alerts", "``pharmacist`` for page forms.")
page_admin = _page_guard(admin, "rule analytics are for administrators", "``admin`` for the analytics page.")


def _secure() -> bool:
    """Cookies are Secure outside the dev profile (same policy as the security module's session cookie)."""
    return get_settings().profile != "dev"


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (size-limited); the last value of each field."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HTTPException(415, "expected a form (application/x-www-form-urlencoded)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "form too large")
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _check_csrf(request: Request, form: dict[str, str]) -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = form.get("csrf", "")
    if not cookie or not sent or not hmac.compare_digest(cookie.encode(), sent.encode()):
        raise PageForbidden("the form's security token is missing or out of date; reload the page and try again")


# --- login / logout ---------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, error: str | None = None) -> Response:
    """Paste a token (until single sign-on puts one in the Authorization header)."""
    message = {"session": "Your session has ended or the token was refused. Sign in again."}.get(error or "")
    return templates.TemplateResponse(request, "login.html", {"error": message}, status_code=200)


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the pasted token, then keep it in the HttpOnly session cookie (verified again on every request)."""
    form = await _form(request)
    token = form.get("token", "").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if token.count(".") != 2 or len(token) > 8000 or any(c.isspace() for c in token):
        return templates.TemplateResponse(
            request, "login.html", {"error": "That is not a JSON Web Token (three parts separated by dots)."}, 400
        )
    try:
        await verify_review_token(token, get_settings())
    except AuthFailure:
        message = "This token was refused (expired, wrong issuer or audience, or a bad signature)."
        return templates.TemplateResponse(request, "login.html", {"error": message}, 401)
    response = RedirectResponse("/review", status_code=303)
    set_session_cookie(response, token, max_age=12 * 3600)
    _set_csrf_cookie(response, secrets.token_urlsafe(32))
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Clear the session cookies."""
    response = RedirectResponse("/review/login", status_code=303)
    clear_session_cookie(response)
    response.delete_cookie(CSRF_COOKIE, path="/review", httponly=True, samesite="strict")
    return response


# --- worklist ---------------------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def worklist(request: Request, principal: Annotated[Principal, Depends(page_reader)]) -> Response:
    """The worklist with filter bar, table and (when ``alert`` is given) the detail panel."""
    return render(request, principal)


def render(
    request: Request,
    principal: Principal,
    *,
    error: str | None = None,
    status_code: int = 200,
    selected: str | None = None,
) -> Response:
    """Render the page for the request's filters (shared by GET and by failed POSTs)."""
    params = dict(request.query_params)
    filters = {k: params.get(k, "") for k in FILTERS}
    filters["status"] = filters["status"] or "open"
    filters["sort"] = filters["sort"] or "severity"
    selected = selected or params.get("alert") or None
    page: dict[str, Any] = {"items": [], "next_cursor": None, "counts": {}}
    try:
        query = _query_from(filters)
        page = core.list_alerts(query, filters["cursor"] or None)
    except core.ReviewError as exc:
        error, status_code = exc.message, exc.status
    detail = None
    if selected:
        try:
            detail = core.alert_detail(selected)
        except core.ReviewError as exc:
            error, status_code = exc.message, exc.status
    now = rq.utcnow()
    base = {k: v for k, v in filters.items() if v and k != "cursor"}
    # The CSRF cookie comes with the login form, or here when the token arrives in a header set by a
    # single sign-on proxy (whose own cookie would otherwise make a cross-site form post look genuine).
    csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
    context = {
        "principal": principal,
        "can_act": "pharmacist" in principal.roles,
        "is_admin": "admin" in principal.roles,
        "filters": filters,
        "base_query": urlencode(base),
        "page": page,
        "counts": page.get("counts") or {},
        "rules": [(r.id, r.title) for r in get_catalog().rules],
        "buckets": rq.BUCKETS,
        "severities": rq.SEVERITIES,
        "sorts": rq.SORTS,
        "detail": detail,
        "actions": core.ACTIONS_BY_STATUS.get(detail["status"], ()) if detail else (),
        "trend_svg": _trend_svgs(detail) if detail else {},
        "reason_names": _reason_names(detail) if detail else {},
        "csrf": csrf,
        "error": error,
        "notice": NOTICES.get(params.get("done", "")),
        "snooze_choices": SNOOZE_CHOICES,
        "age": lambda opened: _age(opened, now),
        "when": _when,
        "link": lambda **extra: "/review?" + urlencode({**base, **{k: v for k, v in extra.items() if v}}),
    }
    response = templates.TemplateResponse(request, "worklist.html", context, status_code=status_code)
    if request.cookies.get(CSRF_COOKIE) != csrf:
        _set_csrf_cookie(response, csrf)
    return response


def _set_csrf_cookie(response: Response, value: str) -> None:
    response.set_cookie(CSRF_COOKIE, value, httponly=True, samesite="strict", secure=_secure(), path="/review")


def _query_from(filters: dict[str, str]) -> rq.Query:
    status = filters["status"] if filters["status"] in rq.BUCKETS else "open"
    sort = filters["sort"] if filters["sort"] in rq.SORTS else "severity"
    severity = filters["severity"] if filters["severity"] in rq.SEVERITIES else None
    return rq.Query(
        status=status,
        rule=filters["rule"] or None,
        severity=severity,
        patient=filters["patient"].strip() or None,
        text=filters["q"].strip()[:100] or None,
        opened_from=core.parse_opened(filters["opened_from"], "opened_from"),
        opened_to=core.parse_opened(filters["opened_to"], "opened_to"),
        sort=sort,
        limit=get_settings().review_page_size,
    )


def _trend_svgs(detail: dict[str, Any]) -> dict[str, str]:
    trend = detail["trend"]
    return {
        "potassium": sparkline(trend["potassium"], trend["start"], trend["end"], "Potassium"),
        "magnesium": sparkline(trend["magnesium"], trend["start"], trend["end"], "Magnesium"),
    }


def _reason_names(detail: dict[str, Any]) -> dict[str, str]:
    return {r["code"]: r["display"] for r in detail.get("override_reasons") or []}


def _age(opened: str | None, now: datetime) -> str:
    seconds = now.timestamp() - rq.epoch(opened)
    if not opened or seconds < 0:
        return "—"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min"


def _when(text: str | None) -> str:
    if not text:
        return "—"
    moment = datetime.fromtimestamp(rq.epoch(text), UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


@router.get("/analytics", response_class=HTMLResponse)
def analytics_page(request: Request, principal: Annotated[Principal, Depends(page_admin)]) -> Response:
    """Per-rule analytics and the audit export form (admins)."""
    from service.review.api import compute_analytics

    context = {"principal": principal, "data": compute_analytics(None, None), "when": _when, "duration": _duration}
    return templates.TemplateResponse(request, "analytics.html", context)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min"


# --- transitions ------------------------------------------------------------------------------------------


@router.post("/alerts/{alert_id}/{action}")
async def act(
    request: Request, alert_id: str, action: str, principal: Annotated[Principal, Depends(page_pharmacist)]
) -> Response:
    """A transition form: check CSRF, apply, redirect back to the worklist with the alert open."""
    form = await _form(request)
    _check_csrf(request, form)
    back = {k: v for k, v in parse_qsl(form.get("back", "")) if k in FILTERS and k != "cursor"}
    request.scope["query_string"] = urlencode(back).encode()
    if action not in NOTICES:
        return render(request, principal, error=f"unknown action {action!r}", status_code=404, selected=alert_id)
    until = None
    if action == "snooze":
        try:
            hours = float(form.get("hours", ""))
        except ValueError:
            return render(request, principal, error="choose how long to snooze", status_code=400, selected=alert_id)
        until = rq.utcnow() + timedelta(hours=hours)
    try:
        revision = int(form.get("revision", ""))
    except ValueError:
        revision = None
    try:
        core.act(
            alert_id,
            action,
            principal.actor,
            revision=revision,
            reason=form.get("reason") or None,
            comment=form.get("comment", "").strip()[:2000] or None,
            until=until,
        )
    except core.ReviewError as exc:
        message = exc.message
        if exc.code == "conflict":
            message += " The alert below shows its current state."
        return render(request, principal, error=message, status_code=exc.status, selected=alert_id)
    target = "/review?" + urlencode({**back, "alert": alert_id, "done": action}) + "#detail"
    return RedirectResponse(target, status_code=303)


async def login_required_handler(request: Request, exc: Exception) -> Response:
    """Send the browser to the login form; the cookie is cleared because it was refused."""
    response = RedirectResponse("/review/login?error=session", status_code=303)
    if request.cookies.get(SESSION_COOKIE):
        clear_session_cookie(response)
    return response


async def forbidden_handler(request: Request, exc: Exception) -> Response:
    """A page-level 403 with the reason."""
    return templates.TemplateResponse(request, "forbidden.html", {"message": str(exc)}, status_code=403)
