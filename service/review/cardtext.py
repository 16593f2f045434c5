"""Card text as the EHR shows it: the card's ``detail`` is CommonMark (CDS Hooks 2.0), rendered here the same
way, safely. Raw HTML is escaped (never passed through), images are not loaded (no request leaves the page
for a card), and links keep only http(s) targets (markdown-it's link validation drops javascript:, data: and
the like) and open in a new tab without a referrer."""

from __future__ import annotations

from functools import cache
from typing import Any

from markdown_it import MarkdownIt
from markupsafe import Markup


@cache
def _renderer() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.disable("image")

    def link_open(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        href = str(token.attrGet("href") or "")
        if not href.lower().startswith(("https://", "http://")):
            token.attrSet("href", "#")
        token.attrSet("target", "_blank")
        token.attrSet("rel", "noopener noreferrer")
        return str(renderer.renderToken(tokens, idx, options, env))

    md.add_render_rule("link_open", link_open)
    return md


def render_card_markdown(text: str | None) -> Markup:
    """HTML of a card's CommonMark ``detail`` (empty when there is none), safe to put in a page."""
    if not text:
        return Markup("")
    return Markup(_renderer().render(text))  # markdown-it escapes every raw HTML and text token
