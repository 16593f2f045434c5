"""The server-rendered page through HTTP (no browser): login CSRF and origin, redirects, first visit, CSRF on
forms, stale-form refusal, grouping by patient, bulk acknowledge, the list fragment, patient context through
the seam, local times, the data-problems page and the analytics page."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest
from auth_helpers import review_headers, review_token
from review_support import HYPOK, REFRACTORY, directory, live_clock, review_client, seed, ward, ward_directory

from workers.state.data_problems import DataProblem, DataProblems

pytestmark = pytest.mark.slow
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def web(store, module_redis_url, key_prefix, monkeypatch, tmp_path):
    seed(store, ward())
    live_clock(store)
    with review_client(monkeypatch, module_redis_url, key_prefix, tmp_path) as client:
        yield client


def _login_csrf(web):
    page = web.get("/review/login")
    assert page.status_code == 200
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def _login(web, sub, *roles):
    csrf = _login_csrf(web)
    body = urlencode({"token": review_token(sub, list(roles)), "csrf": csrf})
    response = web.post("/review/login", content=body, headers=FORM, follow_redirects=False)
    assert response.status_code == 303, response.text
    cookie = response.headers.get_list("set-cookie")
    session = next(c for c in cookie if c.startswith("ehr_alerts_session="))
    assert "HttpOnly" in session and "SameSite=strict" in session.replace("Strict", "strict")
    return response


def _alert_ids(web, **params):
    page = web.get("/review", params={"view": "alerts", **params}).text
    return re.findall(r'href="/review\?[^"]*alert=([0-9a-f-]{36})[^"]*" class="open"', page)


def _form(web, alert_id, action, **fields):
    page = web.get(f"/review?alert={alert_id}").text
    csrf = re.search(r'name="csrf" value="([^"]*)"', page)
    revision = re.search(r'name="revision" value="(\d+)"', page)
    body = {"csrf": csrf.group(1) if csrf else "", "revision": revision.group(1) if revision else "0", **fields}
    return web.post(
        f"/review/alerts/{alert_id}/{action}", content=urlencode(body), headers=FORM, follow_redirects=False
    )


# --- sign in ------------------------------------------------------------------------------------------------


def test_first_visit_gets_the_plain_login_form_and_a_refused_session_says_why(web):
    response = web.get("/review", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/review/login"
    first = web.get("/review/login")
    assert first.status_code == 200 and 'class="banner error"' not in first.text  # no red banner on a first visit
    web.cookies.set("ehr_alerts_session", "aaa.bbb.ccc", domain="testserver.local", path="/")
    refused = web.get("/review", follow_redirects=False)
    assert refused.status_code == 303 and refused.headers["location"] == "/review/login?error=session"
    assert "Your session has ended" in web.get(refused.headers["location"]).text


def test_login_form_is_protected_against_login_csrf(web):
    token = review_token("alice", ["pharmacist"])
    csrf = _login_csrf(web)
    no_field = web.post("/review/login", content=urlencode({"token": token}), headers=FORM, follow_redirects=False)
    assert no_field.status_code == 403
    body = urlencode({"token": token, "csrf": csrf})
    foreign = web.post(
        "/review/login", content=body, headers={**FORM, "Origin": "https://evil.example"}, follow_redirects=False
    )
    assert foreign.status_code == 403 and "another site" in foreign.text
    cross = web.post(
        "/review/login", content=body, headers={**FORM, "Sec-Fetch-Site": "cross-site"}, follow_redirects=False
    )
    assert cross.status_code == 403
    same = web.post(
        "/review/login", content=body, headers={**FORM, "Origin": "https://testserver"}, follow_redirects=False
    )
    assert same.status_code == 303 and "ehr_alerts_session=" in same.headers.get("set-cookie", "")
    assert web.cookies.get("ehr_alerts_csrf") != csrf  # a fresh CSRF value once signed in


def test_login_refuses_what_is_not_a_token(web):
    body = urlencode({"token": "hello", "csrf": _login_csrf(web)})
    response = web.post("/review/login", content=body, headers=FORM)
    assert response.status_code == 400 and "JSON Web Token" in response.text


# --- worklist -------------------------------------------------------------------------------------------------


def test_worklist_groups_by_patient_by_default(web):
    _login(web, "victor", "viewer")
    page = web.get("/review").text
    rows = re.findall(r'<th scope="row" class="who">.*?</tr>', page, re.S)
    assert len(rows) == 5  # p1..p5: one row per patient with alerts
    p1 = next(r for r in rows if ">p1<" in r)
    assert p1.count('class="open"') == 2  # p1's two alerts (hypokalemia and refractory) in one row
    assert "FHIR id (patient details not available)" in p1  # no patient context yet: the id, said plainly
    flat = web.get("/review", params={"view": "alerts"}).text
    assert flat.count('class="open"') == 6 and 'aria-current="page">One row per alert' in flat


def test_pharmacist_acts_through_forms_with_csrf(web):
    _login(web, "alice", "pharmacist")
    alert_id = _alert_ids(web)[0]
    forged = web.post(
        f"/review/alerts/{alert_id}/acknowledge", content="csrf=wrong&revision=1", headers=FORM, follow_redirects=False
    )
    assert forged.status_code == 403
    no_reason = _form(web, alert_id, "override")
    assert no_reason.status_code == 400 and "needs a reason" in no_reason.text
    done = _form(web, alert_id, "override", reason="goals-of-care", comment="ok", back=f"rule={HYPOK}&evil=1")
    assert done.status_code == 303
    location = done.headers["location"]
    assert location.startswith("/review?") and "evil" not in location and f"alert={alert_id}" in location
    detail = web.get(location).text
    assert "status-overridden" in detail and "Alert overridden." in detail
    accepted = _alert_ids(web)[0]
    assert _form(web, accepted, "accept").status_code == 303
    assert "status-accepted" in web.get(f"/review?alert={accepted}&status=all").text


def test_stale_form_keeps_the_comment_and_says_who_changed_what(web):
    _login(web, "alice", "pharmacist")
    alert_id = _alert_ids(web)[0]
    page = web.get(f"/review?alert={alert_id}").text
    csrf = re.search(r'name="csrf" value="([^"]*)"', page).group(1)
    revision = re.search(r'name="revision" value="(\d+)"', page).group(1)
    bob = review_headers("bob", ["pharmacist"])
    moved = web.post(
        f"/api/review/alerts/{alert_id}/transitions", json={"action": "acknowledge", "revision": int(revision)},
        headers=bob,
    )  # fmt: skip
    assert moved.status_code == 200
    body = {"csrf": csrf, "revision": revision, "reason": "goals-of-care", "comment": "palliative, family informed"}
    stale = web.post(f"/review/alerts/{alert_id}/override", content=urlencode(body), headers=FORM)
    assert stale.status_code == 409
    text = stale.text
    assert "Not saved" in text and "user:bob acknowledged it" in text
    assert ">palliative, family informed</textarea>" in text  # the typed comment is kept
    assert '<option value="goals-of-care" selected>' in text
    assert re.search(r'data-canonical="/review\?alert=' + alert_id, text)  # review.js puts this URL back
    assert "UUID" not in text and f"changed since revision {revision}" not in text


def test_bulk_acknowledge_of_one_patient(web):
    _login(web, "alice", "pharmacist")
    page = web.get("/review").text
    form = re.search(r'<form method="post" action="/review/patients/p1/acknowledge".*?</form>', page, re.S).group(0)
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', form))
    assert len([k for k in fields if k.startswith("a:")]) == 2 and "Acknowledge all 2" in form
    stale_id = next(k for k in fields if k.startswith("a:"))[2:]
    web.post(
        f"/api/review/alerts/{stale_id}/transitions",
        json={"action": "snooze", "revision": int(fields[f"a:{stale_id}"]), "until": "2099-01-01T00:00:00Z"},
        headers=review_headers("bob", ["pharmacist"]),
    )  # bob snoozes one meanwhile (refused: the snooze is too long) ...
    web.post(
        f"/api/review/alerts/{stale_id}/transitions",
        json={"action": "override", "revision": int(fields[f"a:{stale_id}"]), "reason": "goals-of-care"},
        headers=review_headers("bob", ["pharmacist"]),
    )  # ... then overrides it
    done = web.post("/review/patients/p1/acknowledge", content=urlencode(fields), headers=FORM, follow_redirects=False)
    assert done.status_code == 303
    after = web.get(done.headers["location"]).text
    assert "1 alert acknowledged. 1 not: it changed since the page was loaded" in after
    statuses = web.get("/api/review/alerts", params={"patient": "p1", "status": "all"}, headers=review_headers(
        "alice", ["pharmacist"])).json()["items"]  # fmt: skip
    assert sorted(a["status"] for a in statuses) == ["acknowledged", "overridden"]


def test_list_fragment_is_the_list_alone(web):
    _login(web, "victor", "viewer")
    fragment = web.get("/review", params={"fragment": "list"}).text
    assert fragment.lstrip().startswith('<section class="list" id="list"') and "<html" not in fragment
    assert re.search(r'data-since="[0-9.]+"', fragment)


def test_viewer_sees_no_forms_and_cannot_post(web):
    _login(web, "victor", "viewer")
    alert_id = _alert_ids(web)[0]
    page = web.get(f"/review?alert={alert_id}").text
    assert "Read-only access" in page and 'action="/review/alerts/' not in page
    assert 'action="/review/patients/' not in web.get("/review").text
    response = web.post(
        f"/review/alerts/{alert_id}/acknowledge", content="csrf=x&revision=1", headers=FORM, follow_redirects=False
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
    first = web.get("/review", params={"rule": HYPOK, "view": "alerts"}).text
    assert first.count('class="open"') == 4
    next_link = re.search(r'href="(/review\?[^"]*cursor=[^"]*)" rel="next"', first).group(1).replace("&amp;", "&")
    second = web.get(next_link).text
    assert second.count('class="open"') == 1 and 'rel="next"' not in second and "First page" in second
    grouped = web.get("/review").text  # 5 patients, 4 per page
    assert grouped.count('<th scope="row" class="who">') == 4 and 'rel="next"' in grouped


def test_user_text_is_escaped(web):
    _login(web, "victor", "viewer")
    page = web.get("/review", params={"q": '"><script>alert(1)</script>'}).text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def test_header_authenticated_page_still_gets_csrf_protection(web):
    """Behind an SSO proxy the token arrives in the Authorization header and there is no login form: the
    page hands out the CSRF cookie itself, and a form post without the matching field is refused."""
    headers = review_headers("alice", ["pharmacist"])
    alert_id = re.search(r"alert=([0-9a-f-]{36})", web.get("/review", headers=headers).text).group(1)
    page = web.get(f"/review?alert={alert_id}", headers=headers)
    cookie = web.cookies.get("ehr_alerts_csrf")
    assert cookie and f'name="csrf" value="{cookie}"' in page.text
    form = {**FORM, **headers}
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


# --- patient context, local time -------------------------------------------------------------------------------


def test_patient_context_search_and_ward_filters_through_the_seam(web):
    with directory(ward_directory()):
        _login(web, "victor", "viewer")
        page = web.get("/review").text
        assert "DOE, Jane" in page and "MRN1001" in page and "Ward 5B bed 1" in page and "Inpatient" in page
        assert re.search(r"DOE, Jane.*?7[0-9] y F", page, re.S)
        by_mrn = web.get("/review", params={"patient": "MRN1004"}).text
        assert by_mrn.count('<th scope="row" class="who">') == 1 and "POE, Edgar" in by_mrn
        by_name = web.get("/review", params={"patient": "oe, "}).text  # DOE, ROE, MOE, POE
        assert by_name.count('<th scope="row" class="who">') == 4
        ed = web.get("/review", params={"ward": "ED"}).text
        assert ed.count('<th scope="row" class="who">') == 1 and "LOW, Karl" in ed  # p5; p6, p7 have no alert
        inpatients = web.get("/review", params={"encounter_class": "IMP", "view": "alerts"}).text
        assert inpatients.count('class="open"') == 5  # p1 (2), p2, p3, p4
        assert '<select id="f-ward" name="ward">' in page and '<option value="ED">' in page
        alert_id = re.search(r"alert=([0-9a-f-]{36})", page).group(1)
        detail = web.get(f"/review?alert={alert_id}").text
        assert re.search(r'class="patient-line">.*?MRN', detail, re.S)
    assert '<select id="f-ward"' not in web.get("/review").text  # no context: no ward filter


def test_times_show_in_the_display_time_zone(web, monkeypatch):
    from config.settings import get_settings

    monkeypatch.setenv("EHR_ALERTS_DISPLAY_TIMEZONE", "America/New_York")
    get_settings.cache_clear()
    _login(web, "victor", "viewer")
    alert_id = _alert_ids(web, rule=REFRACTORY)[0]
    detail = web.get(f"/review?alert={alert_id}").text
    assert "America/New_York" in detail
    # p1's second K was drawn at 2024-04-01T06:00:00Z = 02:00 EDT
    ours = detail.split('id="detail"')[1]
    ours = ours.split("What the card says")[0] + ours.split('<div class="card-detail">')[1].split("</div>", 1)[1]
    assert "01 Apr 2024 02:00 EDT" in ours  # why it fired, evidence, charts (the card text is the EHR's)
    assert "06:00 UTC" not in ours and "2024-04-01T06:00:00Z" not in ours.split("Source resources")[0]


# --- data problems and analytics ------------------------------------------------------------------------------


def test_data_problems_page_lists_and_resolves_with_an_audited_note(web, store):
    problem = DataProblem(
        patient="p2", reason="unknown-unit", detail="unknown unit 'mg%' for magnesium",
        resources=("Observation/mg-p2/_history/1",), as_of="2024-04-01T07:00:00Z",
        rule_id="arrhythmia-with-low-magnesium", concept="magnesium", reported="1.5 mg%",
    )  # fmt: skip
    DataProblems(store.client).record(problem)
    _login(web, "alice", "pharmacist")
    page = web.get("/review/data-problems").text
    assert "Unknown unit" in page and "1.5 mg%" in page and "arrhythmia-with-low-magnesium" in page
    assert "Observation/mg-p2/_history/1" in page and "To fix:" in page
    form = re.search(r'<form method="post" action="/review/data-problems/[0-9a-f]+/resolve".*?</form>', page, re.S)
    action = re.search(r'action="([^"]+)"', form.group(0)).group(1)
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', form.group(0)))
    no_note = web.post(action, content=urlencode(fields), headers=FORM)
    assert no_note.status_code == 400 and "say what was done" in no_note.text
    done = web.post(
        action, content=urlencode({**fields, "comment": "mg% mapped to mg/dL"}), headers=FORM, follow_redirects=False
    )
    assert done.status_code == 303
    assert "No data problems open" in web.get("/review/data-problems").text
    resolved = web.get("/review/data-problems", params={"status": "resolved"}).text
    assert "by user:alice" in resolved and "mg% mapped to mg/dL" in resolved


def test_analytics_page_has_a_window_reason_names_and_definitions(web):
    _login(web, "ada", "admin")
    alert_id = _alert_ids(web)[0]
    assert _form(web, alert_id, "override", reason="mg-already-ordered").status_code == 303
    assert '<option value="30d" selected>' in web.get("/review/analytics").text
    page = web.get("/review/analytics", params={"window": "all"}).text  # the seeded alerts were raised in 2024
    assert '<span title="mg-already-ordered">Magnesium already ordered</span>: 1' in page  # the name, not the code
    assert "Accepted</dt>" in page and "acknowledging is not acceptance" in page
    custom = web.get("/review/analytics", params={"opened_from": "2030-01-01T00:00"}).text
    assert "No alerts raised in this window." in custom
    _login(web, "alice", "pharmacist")
    assert web.get("/review/analytics").status_code == 403
