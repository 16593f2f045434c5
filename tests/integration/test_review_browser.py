"""The review page in a real headless Chromium (Debian's package, driven by Playwright) against the app under
uvicorn on loopback, a Celery worker and a real Redis, seeded by replaying the example stream.

A pharmacist signs in with a token, filters the worklist by rule, opens an alert with the keyboard, overrides it
with a reason and sees the status and the history change. The page is checked at 1366x768 (no horizontal
scrolling, detail panel on screen) and without JavaScript. Screenshot: ``artifacts/review-worklist.png``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from auth_helpers import review_env, review_token
from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARGS += ["--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "artifacts"
ARRHYTHMIA = "arrhythmia-with-low-magnesium"


@pytest.fixture
def seeded(stack, tmp_path):
    """API + worker on the test Redis, trusting the test review issuer; the example stream replayed."""
    stack.start_worker()
    base = stack.start_api(**review_env(tmp_path))
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


def _sign_in(page, base: str, token: str) -> None:
    page.goto(f"{base}/review")
    assert page.url.startswith(f"{base}/review/login"), page.url  # no session: sent to the login form
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/review")


def test_pharmacist_filters_opens_and_overrides_an_alert(seeded, browser):
    base = seeded
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    _sign_in(page, base, review_token("alice", ["pharmacist"], name="Alice Pharmacist"))

    rows = page.locator("table.alerts tbody tr")
    assert rows.count() == 7  # open alerts after the example stream
    assert "Alice Pharmacist" in page.locator("header").inner_text()
    first_severity = rows.nth(0).locator(".sev").inner_text()
    assert "Critical" in first_severity  # severity as text, not colour alone; most severe first

    page.get_by_label("Rule").select_option(ARRHYTHMIA)
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url(f"**rule={ARRHYTHMIA}**")
    assert rows.count() == 2
    assert all(ARRHYTHMIA in rows.nth(i).inner_text() for i in range(2))

    # open the first alert with the keyboard
    link = rows.nth(0).locator("a.open")
    summary = link.inner_text()
    link.focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**alert=**")
    detail = page.locator("#detail")
    assert summary in detail.locator("h2").inner_text()
    assert page.locator("#detail-status").inner_text() == "active"
    assert detail.locator("svg.trend").count() == 2
    assert detail.locator("svg.trend circle").count() >= 1  # the Mg result that fired it is on the chart
    assert "Observation/" in detail.locator("table.evidence").inner_text()
    assert detail.locator(".citations a").count() >= 1

    # every visible form control has a label; every action is a real button
    unlabeled = page.evaluate(
        """[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
             .filter(el => el.labels.length === 0).map(el => el.name)"""
    )
    assert unlabeled == []
    assert page.locator("#detail form button[type=submit]").count() >= 4

    # override with a reason from the rule and a comment
    reason = page.get_by_label("Reason")
    options = reason.locator("option").all_inner_texts()
    assert "Not in line with goals of care" in options
    reason.select_option(label="Not in line with goals of care")
    page.get_by_label("Comment (optional)").fill("comfort care only")
    page.get_by_role("button", name="Override").click()
    page.wait_for_url("**done=override**")
    assert page.get_by_role("status").inner_text() == "Alert overridden."
    assert page.locator("#detail-status").inner_text() == "overridden"
    assert detail.locator("svg.trend circle").count() >= 1
    history = page.locator("#history").inner_text()
    assert "override by user:alice" in history
    assert "Not in line with goals of care" in history and "comfort care only" in history
    assert rows.count() == 1  # it left the open worklist

    # 1366x768: no horizontal scrolling, filter bar and detail panel on screen
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1366, width
    detail_box = detail.bounding_box()
    assert detail_box and detail_box["x"] + detail_box["width"] <= 1366 and detail_box["y"] < 768
    apply_box = page.get_by_role("button", name="Apply").bounding_box()
    assert apply_box and apply_box["y"] + apply_box["height"] <= 768
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{base}/review?rule={ARRHYTHMIA}&status=all&alert=" + page.url.split("alert=")[1].split("&")[0])
    page.screenshot(path=str(ARTIFACTS / "review-worklist.png"))
    assert (ARTIFACTS / "review-worklist.png").stat().st_size > 10_000

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
    _sign_in(page, base, review_token("victor", ["viewer"]))
    rows = page.locator("table.alerts tbody tr")
    assert rows.count() == 7
    rows.nth(0).locator("a.open").click()
    page.wait_for_url("**alert=**")
    assert "read only" in page.locator("header").inner_text()
    assert page.locator("#detail form").count() == 0
    assert "Read-only access" in page.locator("#detail").inner_text()
    context.close()
