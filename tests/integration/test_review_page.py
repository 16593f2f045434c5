"""The server-rendered page through HTTP (no browser): login cookie, redirects, CSRF, role-dependent forms."""

from __future__ import annotations

import re

import pytest
from auth_helpers import review_token
from review_support import HYPOK, review_client, seed, ward

pytestmark = pytest.mark.slow


@pytest.fixture
def web(store, module_redis_url, key_prefix, monkeypatch, tmp_path):
    seed(store, ward())
    with review_client(monkeypatch, module_redis_url, key_prefix, tmp_path) as client:
        yield client


def _login(web, sub, *roles):
    response = web.post(
        "/review/login",
        content=f"token={review_token(sub, list(roles))}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    cookie = response.headers.get_list("set-cookie")
    session = next(c for c in cookie if c.startswith("ehr_alerts_session="))
    assert "HttpOnly" in session and "SameSite=strict" in session.replace("Strict", "strict")
    return response


def _first_alert_id(web):
    page = web.get("/review").text
    return re.search(r"alert=([0-9a-f-]{36})", page).group(1)


def _form(web, alert_id, action, **fields):
    page = web.get(f"/review?alert={alert_id}").text
    csrf = re.search(r'name="csrf" value="([^"]*)"', page)
    revision = re.search(r'name="revision" value="(\d+)"', page)
    body = {"csrf": csrf.group(1) if csrf else "", "revision": revision.group(1) if revision else "0", **fields}
    from urllib.parse import urlencode

    return web.post(
        f"/review/alerts/{alert_id}/{action}",
        content=urlencode(body),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )


def test_no_session_redirects_to_login(web):
    response = web.get("/review", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/review/login")
    assert web.get("/review/login").status_code == 200


def test_login_refuses_what_is_not_a_token(web):
    response = web.post(
        "/review/login", content="token=hello", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 400 and "JSON Web Token" in response.text


def test_refused_token_sends_back_to_login(web):
    web.post(
        "/review/login",
        content="token=aaa.bbb.ccc",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    response = web.get("/review", follow_redirects=False)
    assert response.status_code == 303 and "error=session" in response.headers["location"]


def test_pharmacist_acts_through_forms_with_csrf(web):
    _login(web, "alice", "pharmacist")
    page = web.get("/review")
    assert page.status_code == 200 and '<table class="alerts"' in page.text
    alert_id = _first_alert_id(web)
    forged = web.post(
        f"/review/alerts/{alert_id}/acknowledge",
        content="csrf=wrong&revision=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert forged.status_code == 403
    no_reason = _form(web, alert_id, "override")
    assert no_reason.status_code == 400 and "needs a reason" in no_reason.text
    done = _form(web, alert_id, "override", reason="goals-of-care", comment="ok", back=f"rule={HYPOK}&evil=1")
    assert done.status_code == 303
    location = done.headers["location"]
    assert location.startswith("/review?") and "evil" not in location and f"alert={alert_id}" in location
    detail = web.get(location).text
    assert 'id="detail-status">overridden<' in detail and "Alert overridden." in detail
    stale = web.post(
        f"/review/alerts/{alert_id}/reopen",
        content=f"csrf={web.cookies.get('ehr_alerts_csrf')}&revision=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert stale.status_code == 409 and "reload" in stale.text


def test_viewer_sees_no_forms_and_cannot_post(web):
    _login(web, "victor", "viewer")
    alert_id = _first_alert_id(web)
    page = web.get(f"/review?alert={alert_id}").text
    assert "Read-only access" in page and 'action="/review/alerts/' not in page
    response = web.post(
        f"/review/alerts/{alert_id}/acknowledge",
        content="csrf=x&revision=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert response.status_code == 403


def test_logout_clears_the_session(web):
    _login(web, "alice", "pharmacist")
    response = web.post("/review/logout", follow_redirects=False)
    assert response.status_code == 303
    assert any(c.startswith("ehr_alerts_session=") for c in response.headers.get_list("set-cookie"))
    assert web.get("/review", follow_redirects=False).status_code == 303


def test_next_page_link_walks_the_worklist(web, monkeypatch):
    from config.settings import get_settings

    monkeypatch.setenv("EHR_ALERTS_REVIEW_PAGE_SIZE", "4")
    get_settings.cache_clear()
    _login(web, "victor", "viewer")
    first = web.get("/review?rule=" + HYPOK).text
    assert first.count('class="open"') == 4
    next_link = re.search(r'href="(/review\?[^"]*cursor=[^"]*)" rel="next"', first).group(1).replace("&amp;", "&")
    second = web.get(next_link).text
    assert second.count('class="open"') == 1 and 'rel="next"' not in second and "First page" in second


def test_user_text_is_escaped(web):
    _login(web, "victor", "viewer")
    page = web.get("/review", params={"q": '"><script>alert(1)</script>'}).text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def test_header_authenticated_page_still_gets_csrf_protection(web):
    """Behind an SSO proxy the token arrives in the Authorization header and there is no login form: the
    page hands out the CSRF cookie itself, and a form post without the matching field is refused."""
    from auth_helpers import review_headers

    headers = review_headers("alice", ["pharmacist"])
    alert_id = _first_alert_id_with(web, headers)
    page = web.get(f"/review?alert={alert_id}", headers=headers)
    cookie = web.cookies.get("ehr_alerts_csrf")
    assert cookie and f'name="csrf" value="{cookie}"' in page.text
    form = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    forged = web.post(f"/review/alerts/{alert_id}/acknowledge", content="revision=1", headers=form)
    assert forged.status_code == 403
    revision = re.search(r'name="revision" value="(\d+)"', page.text).group(1)
    done = web.post(
        f"/review/alerts/{alert_id}/acknowledge",
        content=f"csrf={cookie}&revision={revision}",
        headers=form,
        follow_redirects=False,
    )
    assert done.status_code == 303


def _first_alert_id_with(web, headers):
    return re.search(r"alert=([0-9a-f-]{36})", web.get("/review", headers=headers).text).group(1)
