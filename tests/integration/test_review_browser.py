"""The review page in a real headless Chromium (Debian's package, driven by Playwright) against the app under
uvicorn on loopback, a Celery worker and a real Redis, seeded by replaying the example stream; the example
stream's own Patient resources stand behind the patient-context seam.

A pharmacist works a shift: signs in, finds a patient by MRN, reads the detail, sees a new alert arrive without
a reload and opens it from the "n new" cue with the keyboard, overrides an alert with a reason, sees an
override made in the EHR (CDS Hooks feedback) appear, resolves a data-problem item and looks at the analytics.
axe-core (vendored, injected by Playwright) finds no serious or critical violation on the worklist, the detail,
the override form, the data-problems queue and the analytics. Screenshots at 1366x768 and 1920x1080 are written
under ``artifacts/``. The page is also checked without JavaScript, read-only.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from auth_helpers import TestIssuer, review_env, review_token
from itest_builders import potassium
from playwright.sync_api import Page, expect, sync_playwright
from review_support import start_api_with_patients

from workers.state.data_problems import DataProblem, DataProblems

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARGS += ["--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "artifacts"
AXE = ROOT / "tests" / "vendor" / "axe-core" / "axe.min.js"
AXE_SHA256 = "29348999450cdf2849a8e70b7912fc2da85a849da39c0d0d5394f51d4a9ed95c"  # axe-core 4.14.1
SIZES = ((1366, 768), (1920, 1080))
ARRHYTHMIA = "arrhythmia-with-low-magnesium"


@pytest.fixture
def issuer(tmp_path):
    return TestIssuer(tmp_path, name="ehr")


@pytest.fixture
def seeded(stack, tmp_path, issuer):
    """API (with the example patients behind the seam) + worker on the test Redis; the example stream replayed."""
    stack.start_worker()
    env = {**review_env(tmp_path), **issuer.env()}
    env |= {"EHR_ALERTS_REVIEW_POLL_SECONDS": "1", "EHR_ALERTS_DISPLAY_TIMEZONE": "America/New_York"}
    base = start_api_with_patients(stack, **env)
    response = stack.post_ndjson((ROOT / "examples" / "stream" / "events.ndjson").read_text(encoding="utf-8"))
    assert response.status_code == 202, response.text
    stack.drain()
    return base


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is missing: apt-get install -y chromium (.ci/run does this)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def _sign_in(page: Page, base: str, token: str) -> None:
    page.goto(f"{base}/review")
    assert page.url == f"{base}/review/login", page.url  # no session: the plain login form, no error banner
    assert page.locator(".banner.error").count() == 0
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/review")


def _axe(page: Page, where: str, include: str | None = None) -> None:
    """axe-core on the page (or one part of it): no serious or critical violation."""
    assert hashlib.sha256(AXE.read_bytes()).hexdigest() == AXE_SHA256, "tests/vendor/axe-core changed"
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE))
    context = json.dumps({"include": [include]} if include else {"exclude": []})
    violations = page.evaluate(f"async () => (await axe.run({context}, {{resultTypes: ['violations']}})).violations")
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in violations
        if v["impact"] in ("serious", "critical")
    ]
    assert bad == [], f"axe on {where}: {bad}"


def _shots(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate(
        "document.activeElement?.blur(); document.querySelectorAll('.list, .detail').forEach(e => e.scrollTo(0, 0))"
    )
    for width, height in SIZES:
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(100)
        path = ARTIFACTS / f"review-{name}-{width}x{height}.png"
        page.screenshot(path=str(path))
        assert path.stat().st_size > 10_000
        assert page.evaluate("document.documentElement.scrollWidth") <= width, (name, width)  # no sideways scroll
    page.set_viewport_size({"width": 1366, "height": 768})


def _api(base: str, token: str, path: str, **params: str) -> dict:
    import httpx

    response = httpx.get(f"{base}{path}", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _feedback(base: str, issuer: TestIssuer, card: str, reason: dict[str, str]) -> None:
    import httpx

    url = f"{base}/cds-services/mg-k-patient-view/feedback"
    item = {
        "card": card,
        "outcome": "overridden",
        "overrideReason": {"reason": reason, "userComment": "patient on comfort care"},
        "outcomeTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    response = httpx.post(url, json={"feedback": [item]}, headers={"Authorization": f"Bearer {issuer.token(url)}"})
    assert response.status_code == 200 and response.json()["feedback"][0]["status"] == 200, response.text


def test_a_pharmacists_shift(seeded, browser, stack, issuer):
    base = seeded
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    token = review_token("alice", ["pharmacist", "admin"], name="Alice Pharmacist")
    _sign_in(page, base, token)

    # the worklist: one row per patient, named, most pressing first (critical), severity as word and symbol
    rows = page.locator("table.patients tbody tr")
    expected = [g["patient_context"]["name"] for g in _api(base, token, "/api/review/patients")["groups"]]
    assert len(expected) >= 5 and rows.count() == len(expected)
    assert [rows.nth(i).locator(".pname").inner_text() for i in range(rows.count())] == expected
    assert "Alice Pharmacist" in page.locator("header").inner_text()
    assert "America/New_York" in page.locator("header").inner_text()
    assert "Critical" in rows.nth(0).locator(".sev").first.inner_text()
    assert "EXAMPLE, " in rows.nth(0).inner_text() and "MRN" in rows.nth(0).inner_text()
    _axe(page, "the worklist")
    _shots(page, "worklist")

    # find a patient by MRN and open the alert with the keyboard
    page.get_by_label("Patient: name, MRN or id").fill("EX-GOLF")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url("**patient=EX-GOLF**")
    assert rows.count() == 1 and "EXAMPLE, Golf" in rows.nth(0).inner_text()
    link = rows.nth(0).locator("a.open").first
    summary = link.inner_text()
    link.focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**alert=**")
    detail = page.locator("#detail")
    assert summary in detail.locator("h2").inner_text()
    patient_line = detail.locator(".patient-line").inner_text()
    assert "EXAMPLE, Golf" in patient_line and "MRN EX-GOLF" in patient_line and " y " in patient_line + " "
    why = detail.locator("ul.why").inner_text()
    assert "QTc" in why or "Q-T" in why
    assert "[Moles/volume]" not in why and not re.search(r"\d{4}-\d\d-\d\dT", why)
    assert re.search(r"(EST|EDT)", why)  # local time (13 March 2024 is after the US DST change: EDT)
    assert detail.locator(".card-detail p").count() >= 2  # the card as the EHR renders it, paragraphs kept
    assert detail.locator(".card-detail").inner_text().count("**") == 0  # no raw Markdown
    charts = detail.locator("svg.trend")
    assert charts.count() == 2 and detail.locator("svg.trend .threshold").count() == 2
    assert "low Mg < 1.7 mg/dL" in charts.nth(1).text_content()  # the site's Mg unit (default mg/dL)
    smallest = page.evaluate(
        """Math.min(...[...document.querySelectorAll('svg.trend text')].filter(t => t.getBBox().width > 0)
             .map(t => parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a))"""
    )
    assert smallest >= 11, smallest  # readable labels, drawn 1:1
    point = detail.locator("svg.trend .pt").first
    point.focus()
    assert point.locator(".tip").evaluate("el => getComputedStyle(el).visibility") == "visible"
    assert re.search(r"\d{2} \w{3} \d{4} \d\d:\d\d E[SD]T", point.locator(".tip").text_content())
    evidence = detail.locator("table.evidence").inner_text()
    assert "_potassium" not in evidence and "magnesium" not in evidence.split("\n")[0]
    assert page.evaluate("document.activeElement.closest('#detail') !== null")
    unlabeled = page.evaluate(
        """[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
             .filter(el => el.labels.length === 0).map(el => el.name)"""
    )
    assert unlabeled == []
    _axe(page, "the alert detail")
    _axe(page, "the override form", "#override-form")
    _shots(page, "detail")

    # a new patient's alert arrives while the page is open: the cue says so; Enter shows it without a reload
    page.goto(f"{base}/review")
    page.evaluate("window.__same_page = true")
    before = rows.count()
    new_k = potassium("k-mike-1", "ex-mike", 2.9, datetime(2024, 3, 13, 14, 0, tzinfo=UTC))
    assert stack.post_ndjson([new_k]).status_code == 202
    stack.drain()
    cue = page.locator("#new-cue")
    expect(cue).to_be_visible(timeout=20_000)
    assert cue.inner_text().startswith("1 new")
    cue.focus()
    page.keyboard.press("Enter")
    expect(page.locator("table.patients tbody tr")).to_have_count(before + 1, timeout=10_000)
    assert page.evaluate("window.__same_page === true")  # no reload
    assert "EXAMPLE, Mike" in page.locator("#list").inner_text() and cue.is_hidden()
    assert page.evaluate("document.activeElement.id") == "list-h"

    # override an alert with a reason
    mike = page.locator("table.patients tbody tr", has_text="EXAMPLE, Mike")
    mike.locator("a.open").first.click()
    page.wait_for_url("**alert=**")
    reason = page.get_by_label("Reason")
    reason.select_option(label="Not in line with goals of care")
    page.get_by_label("Comment (optional)").fill("comfort care only")
    page.get_by_role("button", name="Override").click()
    page.wait_for_url("**done=override**")
    assert page.get_by_role("status").inner_text() == "Alert overridden."
    assert page.locator("#detail .facts .status").inner_text() == "Overridden"
    history = page.locator("#history").inner_text()
    assert "Overridden by user:alice" in history and "comfort care only" in history

    # an EHR user overrides another alert through CDS Hooks: the worklist shows it, with who and how
    page.goto(f"{base}/review?view=alerts&rule={ARRHYTHMIA}")
    foxtrot = page.locator("table.alerts tbody tr", has_text="EXAMPLE, Foxtrot")
    href = foxtrot.locator("a.open").get_attribute("href")
    alert_id = re.search(r"alert=([0-9a-f-]{36})", href).group(1)
    reason = {"system": "https://ehr-alerts.dev/fhir/CodeSystem/override-reason", "code": "goals-of-care"}
    _feedback(base, issuer, alert_id, reason)
    page.goto(f"{base}/review?status=open&view=alerts&alert={alert_id}")
    row = page.locator("table.alerts tbody tr", has_text="EXAMPLE, Foxtrot")
    assert "Overridden" in row.inner_text()
    last = page.locator("#history li").last.inner_text()
    assert "Overridden by ehr:" in last and "via EHR (CDS Hooks call)" in last and "comfort care" in last

    # a data problem (Kilo's magnesium in "mg%": the pipeline queued it with the indeterminate decision) is
    # resolved, with a note
    fact = next(f for f in stack.store.timeline("ex-kilo") if f.problem)
    assert DataProblems(stack.client).get(DataProblem.from_fact(fact, as_of=fact.start).id) is not None
    page.get_by_role("link", name="Data problems").click()
    page.wait_for_url("**/review/data-problems")
    item = page.locator("table.problem-list tbody tr", has_text="EXAMPLE, Kilo").first
    assert "Unknown unit" in item.inner_text() and "mg%" in item.inner_text() and "EXAMPLE, Kilo" in item.inner_text()
    _axe(page, "the data-problems queue")
    _shots(page, "data-problems")
    item.get_by_label("What was done").fill("mg% mapped to mg/dL in the interface engine")
    item.get_by_role("button", name="Resolve").click()
    page.wait_for_url("**done=resolve**")
    assert page.get_by_role("status").inner_text() == "Data problem resolved."
    assert page.locator("table.problem-list tbody tr", has_text="EXAMPLE, Kilo").count() == 0

    # analytics with a window, reason names and definitions
    page.get_by_role("link", name="Rule analytics").click()
    page.wait_for_url("**/review/analytics")
    figures = page.locator("table.figures").inner_text()
    assert "Not in line with goals of care: 1" in figures and "goals-of-care:" not in figures
    assert "acknowledging is not acceptance" in page.locator(".definitions").inner_text()
    page.get_by_label("Alerts raised").select_option("24h")
    page.get_by_role("button", name="Show", exact=True).click()
    page.wait_for_url("**window=24h**")
    _axe(page, "the analytics")
    _shots(page, "analytics")

    # sign out clears the session
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/review/login")
    page.goto(f"{base}/review")
    assert "/review/login" in page.url
    context.close()


def test_page_reads_without_javascript_and_viewer_cannot_act(seeded, browser):
    base = seeded
    context = browser.new_context(viewport={"width": 1366, "height": 768}, java_script_enabled=False)
    page = context.new_page()
    token = review_token("victor", ["viewer"])
    _sign_in(page, base, token)
    page.get_by_role("link", name="One row per alert").click()
    rows = page.locator("table.alerts tbody tr")
    assert rows.count() == len(_api(base, token, "/api/review/alerts")["items"]) >= 5
    rows.nth(0).locator("a.open").click()
    page.wait_for_url("**alert=**")
    assert "read only" in page.locator("header").inner_text()
    assert page.locator("#detail form").count() == 0
    assert "Read-only access" in page.locator("#detail").inner_text()
    assert page.locator("#new-cue").is_hidden()
    context.close()
