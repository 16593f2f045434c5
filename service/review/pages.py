"""The server-rendered review page ``/review``: login, worklist (by patient or by alert), detail panel,
transition forms, data-problems queue and analytics.

Works without JavaScript: the filter bar is a GET form, the detail panel is selected by a link, every
transition is a POST form answered with a redirect back (303). Forms authenticate by the HttpOnly,
SameSite=Strict session cookie and carry a per-session CSRF token (double submit: a random value in a
second HttpOnly cookie and in a hidden field, compared in constant time); the login form too (login CSRF),
and every POST must come from this service's origin. ``review.js`` adds the "n new" cue (polling) and
whole-row clicks; nothing depends on it.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, parse_qsl, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from config.localtime import format_instant, zone_label
from config.settings import get_settings
from service.review import core, labels, problems
from service.review import patients as directory
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
    same_origin,
    set_session_cookie,
    verify_review_token,
)
from service.review.cardtext import render_card_markdown
from service.review.readable import duration
from workers.pipeline import get_catalog
from workers.state import review_index as rq
from workers.state.data_problems import REASONS, ProblemQuery

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals.update(
    status_label=labels.status_label,
    bucket_label=labels.bucket_label,
    history_label=labels.history_label,
    action_label=lambda a: labels.ACTION_LABELS.get(a, a),
    source_label=lambda s: labels.SOURCE_LABELS.get(s or "stream", s),
    encounter_label=labels.encounter_label,
    status_help=labels.STATUS_LABELS,
    when=format_instant,
)
router = APIRouter(prefix="/review", include_in_schema=False)

FILTERS = (
    "status", "rule", "severity", "patient", "ward", "encounter_class", "q", "opened_from", "opened_to", "sort",
    "view", "cursor",
)  # fmt: skip
_BACK_FILTERS = tuple(k for k in FILTERS if k != "cursor")  # what a form's redirect keeps (not the page)
MAX_FORM_BYTES = 16384
SNOOZE_CHOICES = (1, 4, 8, 24, 72)
NOTICES = {
    "acknowledge": "Alert acknowledged.",
    "accept": "Alert accepted.",
    "override": "Alert overridden.",
    "snooze": "Alert snoozed.",
    "resolve": "Alert resolved.",
    "reopen": "Alert reopened.",
}
ANALYTICS_WINDOWS = {"24h": ("Last 24 hours", 1), "7d": ("Last 7 days", 7), "30d": ("Last 30 days", 30)}
ANALYTICS_WINDOWS |= {"90d": ("Last 90 days", 90), "all": ("All time", None)}


class LoginRequired(Exception):
    """The page needs a (valid) session: answered with a redirect to the login form."""

    def __init__(self, refused: bool = False) -> None:
        super().__init__("login required")
        self.refused = refused  # a session was presented and refused (expired...): say so on the login form


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
                presented = bool(request.cookies.get(SESSION_COOKIE) or request.headers.get("authorization"))
                raise LoginRequired(refused=presented) from exc
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
    """An urlencoded form body (size-limited) from this service's origin; the last value of each field."""
    if not same_origin(request):
        raise PageForbidden("this form was sent from another site; open the review page and try again")
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


def _set_csrf_cookie(response: Response, value: str) -> None:
    response.set_cookie(CSRF_COOKIE, value, httponly=True, samesite="strict", secure=_secure(), path="/review")


def _csrf_for(request: Request) -> str:
    """The CSRF value of this browser (its cookie), or a new one the response sets."""
    return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)


def _template(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    """Render ``name``; hands out the CSRF cookie when the browser has none (the login form, or a page reached
    with a token in a header set by a single sign-on proxy, whose forms must still carry the token)."""
    csrf = context.setdefault("csrf", _csrf_for(request))
    context.setdefault("zone", zone_label())
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    if request.cookies.get(CSRF_COOKIE) != csrf:
        _set_csrf_cookie(response, csrf)
    return response


# --- login / logout ---------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, error: str | None = None) -> Response:
    """Paste a token (until single sign-on puts one in the Authorization header)."""
    message = {"session": "Your session has ended or the token was refused. Sign in again."}.get(error or "")
    return _template(request, "login.html", {"error": message})


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the form's origin and CSRF token and the pasted token, then keep the token in the HttpOnly
    session cookie (verified again on every request)."""
    form = await _form(request)
    _check_csrf(request, form)
    token = form.get("token", "").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if token.count(".") != 2 or len(token) > 8000 or any(c.isspace() for c in token):
        message = "That is not a JSON Web Token (three parts separated by dots)."
        return _template(request, "login.html", {"error": message}, 400)
    try:
        await verify_review_token(token, get_settings())
    except AuthFailure:
        message = "This token was refused (expired, wrong issuer or audience, or a bad signature)."
        return _template(request, "login.html", {"error": message}, 401)
    response = RedirectResponse("/review", status_code=303)
    set_session_cookie(response, token, max_age=12 * 3600)
    _set_csrf_cookie(response, secrets.token_urlsafe(32))  # a new value once signed in
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Clear the session cookies."""
    if not same_origin(request):
        raise PageForbidden("this form was sent from another site; open the review page and try again")
    response = RedirectResponse("/review/login", status_code=303)
    clear_session_cookie(response)
    response.delete_cookie(CSRF_COOKIE, path="/review", httponly=True, samesite="strict")
    return response


# --- worklist ---------------------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def worklist(request: Request, principal: Annotated[Principal, Depends(page_reader)]) -> Response:
    """The worklist (grouped by patient, or one row per alert), the filter bar and, when ``alert`` is given,
    the detail panel. ``fragment=list`` renders the list alone (what the "n new" cue swaps in)."""
    return render(request, principal)


def _filters(request: Request) -> dict[str, str]:
    params = dict(request.query_params)
    filters = {k: params.get(k, "").strip() for k in FILTERS}
    filters["status"] = filters["status"] if filters["status"] in rq.BUCKETS else "todo"
    filters["sort"] = filters["sort"] if filters["sort"] in rq.SORTS else "severity"
    filters["view"] = "alerts" if filters["view"] == "alerts" else "patients"
    filters["severity"] = filters["severity"] if filters["severity"] in rq.SEVERITIES else ""
    return filters


def render(
    request: Request,
    principal: Principal,
    *,
    error: str | None = None,
    status_code: int = 200,
    selected: str | None = None,
    draft: dict[str, Any] | None = None,
    changed: list[dict[str, Any]] | None = None,
) -> Response:
    """Render the page for the request's filters (shared by GET and by failed POSTs)."""
    params = dict(request.query_params)
    filters = _filters(request)
    selected = selected or params.get("alert") or None
    page: dict[str, Any] = {"items": [], "groups": [], "next_cursor": None, "counts": {}}
    try:
        query = _query_from(filters)
        if filters["view"] == "patients":
            page = {"items": [], **core.list_patients(query, filters["cursor"] or None)}
        else:
            page = {"groups": [], **core.list_alerts(query, filters["cursor"] or None)}
    except core.ReviewError as exc:
        error, status_code = exc.message, exc.status
    detail = None
    if selected:
        try:
            detail = core.alert_detail(selected)
        except core.ReviewError as exc:
            error, status_code = exc.message, exc.status
    base = {k: v for k, v in filters.items() if v and k != "cursor" and (k, v) not in _DEFAULTS}
    people = directory.directory()
    context_available = people.available  # a Redis read with the stored directory: once per render
    context = {
        "principal": principal,
        "can_act": "pharmacist" in principal.roles,
        "is_admin": "admin" in principal.roles,
        "filters": filters,
        "base_query": urlencode(base),
        "page": page,
        "counts": page.get("counts") or {},
        "rules": [(r.id, r.title) for r in get_catalog().rules],
        "buckets": ("todo", "open", "closed", "all", *rq.STATUSES),
        "severities": rq.SEVERITIES,
        "sorts": rq.SORTS,
        "context_available": context_available,
        "wards": people.wards() if context_available else [],
        "classes": labels.ENCOUNTER_CLASSES,
        "detail": detail,
        "actions": core.ACTIONS_BY_STATUS.get(detail["status"], ()) if detail else (),
        "charts": core.trend_charts(detail) if detail else {},
        "card_html": render_card_markdown((detail.get("card") or {}).get("detail")) if detail else "",
        "reason_names": _reason_names(detail) if detail else {},
        "error": error,
        "draft": draft or {},
        "changed": changed or [],
        "notice": NOTICES.get(params.get("done", "")) or _bulk_notice(params),
        "snooze_choices": SNOOZE_CHOICES,
        "poll_seconds": get_settings().review_poll_seconds,
        "rendered_at": rq.utcnow().timestamp(),
        "canonical": "/review?" + urlencode({**base, **({"alert": selected} if selected else {})}),
        "link": lambda **extra: "/review?" + urlencode({**base, **{k: v for k, v in extra.items() if v}}),
    }
    name = "_list.html" if params.get("fragment") == "list" else "worklist.html"
    return _template(request, name, context, status_code)


_DEFAULTS = {("status", "todo"), ("sort", "severity"), ("view", "patients")}


def _query_from(filters: dict[str, str]) -> rq.Query:
    return core.build_query(
        filters["status"],
        rule=filters["rule"],
        severity=filters["severity"],
        patient=filters["patient"][:100],
        text=filters["q"][:100],
        opened_from=filters["opened_from"],
        opened_to=filters["opened_to"],
        sort=filters["sort"],
        limit=None,
        ward=filters["ward"],
        encounter_class=filters["encounter_class"],
        group=filters["view"] == "patients",
    )


def _reason_names(detail: dict[str, Any]) -> dict[str, str]:
    return {r["code"]: r["display"] for r in detail.get("override_reasons") or []}


# --- transitions ------------------------------------------------------------------------------------------


def _back(request: Request, form: dict[str, str], names: tuple[str, ...] = _BACK_FILTERS) -> dict[str, str]:
    """The filters the form came from (only the filter ``names`` of its page), made the request's own query
    string so a refusal renders the same page."""
    back = {k: v for k, v in parse_qsl(form.get("back", "")) if k in names}
    request.scope["query_string"] = urlencode(back).encode()
    return back


def _revision(form: dict[str, str]) -> int | None:
    """The revision the form was rendered at (None: missing or unreadable)."""
    try:
        return int(form.get("revision", ""))
    except ValueError:
        return None


@router.post("/alerts/{alert_id}/{action}")
async def act(
    request: Request, alert_id: str, action: str, principal: Annotated[Principal, Depends(page_pharmacist)]
) -> Response:
    """A transition form: check origin and CSRF, apply, redirect back to the worklist with the alert open. A
    stale form (someone acted first) is refused with who changed what, and the typed comment kept."""
    form = await _form(request)
    _check_csrf(request, form)
    back = _back(request, form)
    if action not in NOTICES:
        return render(request, principal, error=f"unknown action {action!r}", status_code=404, selected=alert_id)
    draft = {"action": action, "reason": form.get("reason", ""), "comment": form.get("comment", "")[:2000]}
    until = None
    if action == "snooze":
        try:
            until = rq.utcnow() + timedelta(hours=float(form.get("hours", "")))
        except ValueError:
            return render(request, principal, error="choose how long to snooze", status_code=400, selected=alert_id)
    revision = _revision(form)
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
        changed = _changed_since(alert_id, revision) if exc.code == "conflict" else []
        message = _conflict_message(changed) if exc.code == "conflict" else exc.message
        return render(
            request, principal, error=message, status_code=exc.status, selected=alert_id, draft=draft, changed=changed
        )
    target = "/review?" + urlencode({**back, "alert": alert_id, "done": action}) + "#detail"
    return RedirectResponse(target, status_code=303)


def _changed_since(alert_id: str, revision: int | None) -> list[dict[str, Any]]:
    alert = core.get_index().store.find_alert(alert_id)
    return core.changes_since(alert, revision or 0) if alert else []


def _conflict_message(changed: list[dict[str, Any]]) -> str:
    """``Not saved: while you were reading, user:bob overrode it (14:02 CEST). ...``"""
    if not changed:
        return "Not saved: the alert changed while you were reading it. Check its current state below."
    done = "; ".join(
        f"{e.get('by', 'someone')} {labels.history_label(e.get('action')).lower()} it ({format_instant(e.get('at'))})"
        for e in changed[-3:]
    )
    return (
        f"Not saved: while you were reading, {done}. The alert below shows its current state; your comment is "
        "kept in the form — check it and send it again if it still applies."
    )


@router.post("/patients/{patient_id}/acknowledge")
async def acknowledge_patient(
    request: Request, patient_id: str, principal: Annotated[Principal, Depends(page_pharmacist)]
) -> Response:
    """Bulk acknowledge: every active alert of one patient listed in the form (``a:<id>`` = revision seen)."""
    form = await _form(request)
    _check_csrf(request, form)
    back = _back(request, form)
    seen: dict[str, int] = {}
    for name, value in form.items():
        if name.startswith("a:") and value.isdigit():
            seen[name[2:]] = int(value)
    if not seen or not core.PATIENT_ID.match(patient_id):
        return render(request, principal, error="no active alert of this patient to acknowledge", status_code=400)
    results = core.acknowledge_patient(patient_id, seen, principal.actor, form.get("comment", "").strip() or None)
    done = sum(r["status"] == 200 for r in results)
    outcome = {"done": "bulk", "acknowledged": str(done), "refused": str(len(results) - done)}
    return RedirectResponse("/review?" + urlencode({**back, **outcome}), status_code=303)


def _bulk_notice(params: dict[str, str]) -> str | None:
    """The notice after a bulk acknowledge (counts only: no text comes from the URL)."""
    if params.get("done") != "bulk":
        return None
    done = int(params["acknowledged"]) if params.get("acknowledged", "").isdigit() else 0
    refused = int(params["refused"]) if params.get("refused", "").isdigit() else 0
    text = f"{done} alert{'s' if done != 1 else ''} acknowledged."
    if refused:
        text += f" {refused} not: {'it' if refused == 1 else 'they'} changed since the page was loaded (shown now)."
    return text


# --- data problems ----------------------------------------------------------------------------------------


@router.get("/data-problems", response_class=HTMLResponse)
def data_problems_page(request: Request, principal: Annotated[Principal, Depends(page_reader)]) -> Response:
    """The data-problems queue: indeterminate decisions' causes, for the lab-interface analyst."""
    return _render_problems(request, principal)


def _render_problems(
    request: Request, principal: Principal, *, error: str | None = None, status_code: int = 200
) -> Response:
    params = dict(request.query_params)
    status = params.get("status") if params.get("status") in ("open", "resolved", "all") else "open"
    reason = params.get("reason") if params.get("reason") in REASONS else None
    query = ProblemQuery(status=status, reason=reason, limit=get_settings().review_page_size)
    try:
        page = problems.list_problems(query, params.get("cursor") or None)
    except core.ReviewError as exc:
        page, error, status_code = {"items": [], "next_cursor": None, "counts": {}}, exc.message, exc.status
    base = {k: v for k, v in (("status", status), ("reason", reason or "")) if v}
    context = {
        "principal": principal,
        "can_act": "pharmacist" in principal.roles,
        "is_admin": "admin" in principal.roles,
        "page": page,
        "status": status,
        "reason": reason or "",
        "reasons": REASONS,
        "error": error,
        "notice": {"resolve": "Data problem resolved.", "reopen": "Data problem reopened."}.get(params.get("done", "")),
        "base_query": urlencode(base),
        "link": lambda **extra: "/review/data-problems?" + urlencode({**base, **{k: v for k, v in extra.items() if v}}),
    }
    return _template(request, "data_problems.html", context, status_code)


@router.post("/data-problems/{item_id}/{action}")
async def data_problem_act(
    request: Request, item_id: str, action: str, principal: Annotated[Principal, Depends(page_pharmacist)]
) -> Response:
    """Resolve (with a note) or reopen a data problem from its form."""
    form = await _form(request)
    _check_csrf(request, form)
    back = _back(request, form, ("status", "reason"))
    revision = _revision(form)
    if action not in ("resolve", "reopen"):
        return _render_problems(request, principal, error=f"unknown action {action!r}", status_code=404)
    try:
        problems.act(item_id, action, principal.actor, revision=revision, comment=form.get("comment"))
    except core.ReviewError as exc:
        return _render_problems(request, principal, error=exc.message, status_code=exc.status)
    return RedirectResponse("/review/data-problems?" + urlencode({**back, "done": action}), status_code=303)


# --- analytics --------------------------------------------------------------------------------------------


@router.get("/analytics", response_class=HTMLResponse)
def analytics_page(request: Request, principal: Annotated[Principal, Depends(page_admin)]) -> Response:
    """Per-rule analytics over a time window (by when alerts were raised), their definitions, and the audit
    export form (admins)."""
    from service.review.api import DEFINITIONS, compute_analytics

    params = dict(request.query_params)
    window = params.get("window") if params.get("window") in ANALYTICS_WINDOWS else "30d"
    error, status_code = None, 200
    start = end = None
    if params.get("opened_from") or params.get("opened_to"):
        window = "custom"
        try:
            start = core.parse_opened(params.get("opened_from"), "opened_from")
            end = core.parse_opened(params.get("opened_to"), "opened_to")
        except core.ReviewError as exc:
            error, status_code = exc.message, exc.status
    elif ANALYTICS_WINDOWS[window][1] is not None:
        start = rq.utcnow() - timedelta(days=ANALYTICS_WINDOWS[window][1] or 0)
    context = {
        "principal": principal,
        "is_admin": True,
        "data": compute_analytics(start, end),
        "definitions": DEFINITIONS,
        "windows": ANALYTICS_WINDOWS,
        "window": window,
        "params": params,
        "error": error,
        "duration": lambda seconds: "—" if seconds is None else duration(seconds),
    }
    return _template(request, "analytics.html", context, status_code)


# --- errors -----------------------------------------------------------------------------------------------


async def login_required_handler(request: Request, exc: Exception) -> Response:
    """Send the browser to the login form; a refused session cookie is cleared and the form says why (a first
    visit, with no session at all, gets the plain form)."""
    refused = isinstance(exc, LoginRequired) and exc.refused
    response = RedirectResponse("/review/login?error=session" if refused else "/review/login", status_code=303)
    if request.cookies.get(SESSION_COOKIE):
        clear_session_cookie(response)
    return response


async def forbidden_handler(request: Request, exc: Exception) -> Response:
    """A page-level 403 with the reason."""
    return templates.TemplateResponse(request, "forbidden.html", {"message": str(exc)}, status_code=403)
