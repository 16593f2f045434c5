"""Card text as a CDS client renders it (issue 10 item 11): every card detail of every embedded rule test is
CommonMark whose paragraphs are the ones the template meant (no blank line lost after ``{% endif %}``), free text
from the EHR never becomes a link, HTML or formatting (also with GFM-style autolinking), QTc is in ms and a value
is shown in the lab's unit plus mmol/L when they differ."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fhir_builders import (
    ARRHYTHMIA,
    FUROSEMIDE,
    HYPOK,
    REFRACTORY,
    ago,
    concept,
    condition,
    decide,
    ecg,
    magnesium,
    med_request,
    med_statement,
    packaged_catalog,
    potassium,
    qtc,
)
from markdown_it import MarkdownIt

from rules.cards import markdown_text, render_text
from rules.catalog import load_catalog
from rules.catalog import test_facts as embedded_test_facts
from rules.engine import evaluate_rule

COMMONMARK = MarkdownIt("commonmark", {"html": True})
GFM_LIKE = MarkdownIt("gfm-like", {"html": True})  # tables, strikethrough and linkify (bare URLs, www., e-mails)
# What starts a paragraph of its own in the shipped card templates.
OPENERS = re.compile(r"^(\*\*[A-Z]|\*(Why it matters|Suggested|Critical|Warning|Data note)\b|Source:)")


def _fired_cards() -> list[tuple[str, dict[str, Any]]]:
    cards = []
    for rule in packaged_catalog().rules:
        for index, case in enumerate(rule.tests):
            facts, _ = embedded_test_facts(rule, index)
            decision = evaluate_rule(rule, facts, case.now, case.patient)
            if decision.card is not None:
                cards.append((f"{rule.id}: {case.name}", decision.card))
    return cards


FIRED = _fired_cards()


def _paragraph_lines(markdown: str) -> list[list[str]]:
    tokens = COMMONMARK.parse(markdown)
    return [
        tokens[i + 1].content.split("\n")
        for i, token in enumerate(tokens)
        if token.type == "paragraph_open" and tokens[i + 1].type == "inline"
    ]


def test_every_rule_has_fired_cards_to_check():
    assert {name.split(":")[0] for name, _ in FIRED} == {r.id for r in load_catalog().rules}


@pytest.mark.parametrize(("name", "card"), FIRED, ids=[n for n, _ in FIRED])
def test_each_card_detail_renders_as_the_intended_paragraphs(name: str, card: dict[str, Any]):
    """No paragraph swallows the next one: a line that opens a paragraph is always the first line of one."""
    detail = card["detail"]
    for lines in _paragraph_lines(detail):
        merged = [line for line in lines[1:] if OPENERS.match(line)]
        assert merged == [], f"{name}: paragraphs merged: {lines}"
    assert "\n\n\n" not in detail
    html = GFM_LIKE.render(detail)
    assert "<a " not in html and "<script" not in html.lower(), name


def test_a_blank_line_after_an_inline_endif_is_kept():
    template = "A.{% if x %} B.{% endif %}\n\nC.\n{% if y %}\n\nD.\n{% endif %}\n\nE."
    assert render_text(template, {"x": True, "y": False}) == "A. B.\n\nC.\n\nE."
    assert render_text(template, {"x": False, "y": True}) == "A.\n\nC.\n\nD.\n\nE."
    assert [p[0] for p in _paragraph_lines(render_text(template, {"x": True, "y": True}))] == [
        "A. B.",
        "C.",
        "D.",
        "E.",
    ]


HOSTILE = [
    "Furosemide see https://evil.com/x now",
    "www.evil.com furosemide",
    "furosemide, questions: pharmacist@evil.com",
    "<img src=x onerror=alert(1)> furosemide",
    "[furosemide](https://evil.com) **bold** _it_ `code` ~~gone~~",
    "1. furosemide",
    "# furosemide",
    "furosemide | col | x",
    "evil.com/furosemide",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_free_text_from_the_ehr_never_becomes_a_link_html_or_formatting(text: str):
    for renderer in (COMMONMARK, GFM_LIKE):
        html = renderer.render(markdown_text(text))
        assert "<a " not in html and "<img" not in html and "<strong>" not in html and "<em>" not in html
        assert "<code>" not in html and "<h1>" not in html and "<ol>" not in html and "<table>" not in html
        assert "<s>" not in html and "<del>" not in html
        visible = re.sub(r"<[^>]+>", "", html).replace("\u2060", "")
        unescaped = visible.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&quot;", '"')
        assert unescaped.strip() == " ".join(text.split())  # the reader sees exactly the EHR's text


def test_a_hostile_drug_name_and_resource_id_stay_plain_on_a_real_card():
    name = "Lasix https://evil.com <b>x</b> www.evil.com a@b.com"
    diuretic = med_statement(concept(text=name), id="www.evil.com")
    decision = decide(REFRACTORY, diuretic, potassium(3.2, at=ago(30)), potassium(3.3, at=ago(2)))
    assert decision.fires
    html = GFM_LIKE.render(decision.card["detail"])
    assert "<a " not in html and "<b>" not in html


def test_qtc_is_shown_in_ms_and_values_in_the_reported_unit_plus_mmol_per_l():
    decision = decide(ARRHYTHMIA, qtc(0.53, "s", at=ago(3)), magnesium(1.1, "mg/dL"))
    assert "QTc 530 ms" in decision.card["summary"]
    assert "QTc 530 ms (reported as 0.53 s)" in decision.card["detail"]
    assert "1.1 mg/dL (0.45 mmol/L)" in decision.card["detail"]
    same_unit = decide(ARRHYTHMIA, ecg(at=ago(3)), magnesium(0.6)).card["detail"]
    assert "**Magnesium 0.6 mmol/L** on" in same_unit and "(0.6 mmol/L)" not in same_unit


def test_hypokalemia_card_keeps_its_paragraphs_with_a_treatment_order_and_a_data_note():
    draft = med_request(FUROSEMIDE, status="draft", authored=None)
    decision = decide(HYPOK, potassium(2.9, None), draft)
    paragraphs = [lines[0] for lines in _paragraph_lines(decision.card["detail"])]
    assert any(p.startswith("**Being ordered:**") for p in paragraphs)
    assert any(p.startswith("*Data note:*") for p in paragraphs)
    assert any(p.startswith("*Suggested:*") for p in paragraphs)


def test_arrhythmia_card_lists_evidence_as_a_list():
    decision = decide(ARRHYTHMIA, condition(onset=ago(20)), ecg(at=ago(3)), magnesium(0.6))
    tokens = COMMONMARK.parse(decision.card["detail"])
    items = [t for t in tokens if t.type == "list_item_open"]
    assert len(items) == 2


def test_a_versioned_reference_reads_as_it_is_in_the_raw_detail():
    decision = decide(HYPOK, potassium(3.1, id="k-1", version="2"))
    assert "(Observation/k-1/_history/2)" in decision.card["detail"]  # no backslash: nothing to escape in an id
