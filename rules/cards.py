"""Card rendering: a rule's card template + a decision -> a CDS Hooks 2.0 card body (without uuid).

Templates are Jinja2 in a sandbox with StrictUndefined, so a typo in a rule file fails when the rule's
embedded tests run at load time, not in front of a clinician. The service adds the card ``uuid``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from decimal import Decimal
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from jinja2 import StrictUndefined, Template
from jinja2.sandbox import SandboxedEnvironment

from rules.facts import Fact, format_decimal
from rules.fhirtime import isoformat, local_text
from rules.units import unit_key

if TYPE_CHECKING:
    from rules.engine import Decision, Selection
    from rules.model import Parameter, Rule


class _CardEnvironment(SandboxedEnvironment):
    """The sandbox, with a short way to the public attributes of the template views below (plain values the
    engine made; the sandbox's checks on every attribute read were a large share of rendering a card)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) in _VIEWS and not attribute.startswith("_"):
            try:
                return getattr(obj, attribute)
            except AttributeError:
                pass  # the sandbox's own path gives the same (strict) undefined as before
        return super().getattr(obj, attribute)


_ENV = _CardEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False, trim_blocks=False, lstrip_blocks=True
)
SUMMARY_LIMIT = 140


_TEMPLATE_MARKERS = ("{{", "{%", "{#")
# A line holding nothing but block tags / comments leaves no line behind (Jinja's trim_blocks, but only for such
# lines: trim_blocks also ate the newline after a tag that ends a line of text, so a blank line after
# "...documented.{% endif %}" vanished and two Markdown paragraphs became one).
_TAG_ONLY_LINE = re.compile(r"(?m)^([ \t]*(?:(?:\{%(?:(?!%\}).)*%\}|\{#(?:(?!#\}).)*#\})[ \t]*)+)\n")
_EXTRA_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


@cache
def _template(text: str) -> Template | None:
    """The compiled template, or None for text Jinja would give back as it is (no markup, no CR to normalise)."""
    if "\r" not in text and not any(marker in text for marker in _TEMPLATE_MARKERS):
        return None
    return _ENV.from_string(_TAG_ONLY_LINE.sub(r"\1", text.replace("\r\n", "\n")))


def render_text(text: str, context: Mapping[str, Any]) -> str:
    """Render one template string (runs of blank lines become one: a paragraph break)."""
    template = _template(text)
    rendered = text if template is None else template.render(context)
    return _EXTRA_BLANK_LINES.sub("\n\n", rendered).strip()


def _shown(reported: str) -> str:
    """Display rounding only (4 decimals: 3.4999 stays 3.4999, 3.4832272433592126 shows as 3.4832)."""
    try:
        return format_decimal(Decimal(reported), 4)
    except ArithmeticError:
        return reported


_MARKDOWN_ACTIVE = re.compile(r"([\\`*_\[\]<>&~|!])")
_JOINER = "\u2060"  # WORD JOINER: invisible, and not a character of a URL, a domain or an e-mail address
_DOMAIN_DOT = re.compile(r"(?<=[A-Za-z0-9])\.(?=[A-Za-z])")
_LIST_NUMBER = re.compile(r"^(\d{1,9})([.)])")


_NOTHING_TO_ESCAPE = re.compile(r"[A-Za-z][A-Za-z0-9 ,/()%-]*")  # most displays, units, references and notes


@lru_cache(maxsize=65_536)  # pure; the same displays, references and units come back on every evaluation
def markdown_text(text: str) -> str:
    """Free text from the data (a display, a note, a resource id) as literal Markdown text: one line, with the
    characters that start HTML, links, emphasis, tables or code backslash-escaped, and with what renderers turn
    into links by themselves (GFM autolinks ``www.``, ``http://`` and e-mail addresses; linkify's bare domains)
    broken by an invisible word joiner. Card details are GitHub-flavoured Markdown and some clients render raw
    HTML in them: text from the EHR must never become a link, HTML or formatting."""
    if _NOTHING_TO_ESCAPE.fullmatch(text) and "  " not in text and "//" not in text:
        return text
    line = _MARKDOWN_ACTIVE.sub(r"\\\1", " ".join(text.split()))
    line = _LIST_NUMBER.sub(r"\1\\\2", unlinked(line))
    return "\\" + line if line[:1] in ("#", "+", "-", "=") else line


@lru_cache(maxsize=65_536)
def unlinked(text: str) -> str:
    """Text with what renderers would autolink (``www.``, ``http://``, e-mail addresses, bare domains) broken by
    an invisible word joiner; for a FHIR reference, whose characters (letters, digits, ``-``, ``.``, ``/``,
    ``_history``) can start no other Markdown, this is all the escaping it needs."""
    line = _DOMAIN_DOT.sub("." + _JOINER, text)
    line = line.replace(":/", _JOINER + ":" + _JOINER + "/").replace("//", "/" + _JOINER + "/")
    return line.replace("@", _JOINER + "@" + _JOINER)


class _lazy:
    """``functools.cached_property`` without its per-instance lock (Python 3.11 takes one on every first
    read, a large share of rendering a card): computes on first read, then the instance attribute wins."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.func(instance)
        return value


class FactView:
    """What a template sees of one fact (each field computed when a template first reads it: templates
    read a few fields of the latest fact, and building every field of every fact was most of the cost
    of rendering a card). Times are shown in the display zone the catalog was set up with."""

    def __init__(self, fact: Fact, zone: str = "UTC") -> None:
        self._fact = fact
        self._zone = zone

    @_lazy
    def value(self) -> str:
        return format_decimal(self._fact.value) if self._fact.value is not None else "?"

    @_lazy
    def reported(self) -> str:
        fact = self._fact
        return f"{fact.comparator or ''}{_shown(fact.reported_value)}" if fact.reported_value else "?"

    @_lazy
    def reported_unit(self) -> str:
        return markdown_text(self._fact.reported_unit) if self._fact.reported_unit else ""

    @_lazy
    def unit(self) -> str:
        return self._fact.unit or ""

    @_lazy
    def canonical(self) -> str:
        """The value in the rule's canonical unit (``520 ms``, ``0.62 mmol/L``)."""
        fact = self._fact
        return f"{fact.comparator or ''}{self.value} {self.unit}" if fact.value is not None else "?"

    @_lazy
    def shown(self) -> str:
        """The value as the lab reported it, plus the canonical unit when it differs (``1.5 mg/dL (0.62 mmol/L)``)."""
        fact = self._fact
        text = f"{self.reported} {self.reported_unit}".rstrip()
        if fact.value is not None and fact.unit and unit_key(fact.reported_unit) != unit_key(fact.unit):
            text += f" ({self.canonical})"
        return text

    @_lazy
    def time(self) -> str:
        return isoformat(self._fact.start) or "unknown time"

    @_lazy
    def date(self) -> str:
        """``31 Mar 2024 03:30 CEST`` in the display zone."""
        return local_text(self._fact.start, self._zone) if self._fact.start else "unknown time"

    @_lazy
    def short(self) -> str:
        """``31 Mar 03:30 CEST`` (summaries)."""
        return local_text(self._fact.start, self._zone, "short") if self._fact.start else "unknown time"

    @_lazy
    def reference_low(self) -> str:
        """The lab's lower reference limit in the result's unit (``3.3 mmol/L``), or ``""`` when not given."""
        fact = self._fact
        if fact.reference_low_reported is None:
            return ""
        return f"{format_decimal(fact.reference_low_reported, 4)} {self.reported_unit}".rstrip()

    @_lazy
    def ref(self) -> str:
        return unlinked(self._fact.reference)  # ids are the EHR's: www.example.org is a valid FHIR id

    @_lazy
    def display(self) -> str:
        return markdown_text(self._fact.display or self._fact.concept)  # free text of the EHR's data

    @_lazy
    def concept(self) -> str:
        return self._fact.concept

    @_lazy
    def notes(self) -> list[str]:
        return [markdown_text(note) for note in self._fact.notes]  # notes quote the EHR (dataAbsentReason text)


class InputView:
    """What a template sees of one input: ``present``, ``count``, the latest fact's fields, ``items``."""

    def __init__(self, selection: Selection, zone: str = "UTC") -> None:
        self._selection = selection
        self._zone = zone
        self.present = bool(selection.facts)
        self.count = len(selection.facts)
        self._latest = FactView(selection.facts[-1], zone) if selection.facts else None

    @_lazy
    def items(self) -> list[FactView]:
        return [FactView(f, self._zone) for f in self._selection.facts]

    @_lazy
    def window_start(self) -> str:
        return isoformat(self._selection.window_start) or "the start of the record"

    @_lazy
    def since(self) -> str:
        """The window's start in the display zone (``28 Apr 2024 08:00 CEST``)."""
        start = self._selection.window_start
        return local_text(start, self._zone) if start else "the start of the record"

    @_lazy
    def window_end(self) -> str | None:
        return isoformat(self._selection.window_end)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or self._latest is None:
            raise AttributeError(name)
        return getattr(self._latest, name)


class ParamView:
    """What a template sees of one parameter: ``value``, ``unit``, ``hours``, ``count``, and ``against(input)``:
    the threshold the input's latest result was compared with, in words (the lab's lower reference limit when
    the parameter uses it and the result has one)."""

    def __init__(self, param: Parameter) -> None:
        self._param = param
        self.value = format_decimal(param.value, 4) if param.value is not None else None
        self.unit = param.unit
        self.hours = format_decimal(Decimal(str(param.hours))) if param.hours is not None else None
        self.count = param.count
        self.reference_low = param.reference_low

    def uses_lab_range(self, view: InputView) -> bool:
        """True when the input's latest result is compared with the lab's lower reference limit."""
        latest = view._latest
        return bool(self._param.reference_low and latest is not None and latest.reference_low)

    def against(self, view: InputView) -> str:
        """``3.3 mmol/L (the lab's lower reference limit)`` or ``3.5 mmol/L (rule threshold)``."""
        if self.uses_lab_range(view) and view._latest is not None:
            return f"{view._latest.reference_low} (the lab's lower reference limit)"
        return f"{self.value} {self.unit} (rule threshold)"


_VIEWS = (FactView, InputView, ParamView)


def template_context(
    rule: Rule, decision: Decision, chosen: Mapping[str, Selection], offered: Collection[str] = ()
) -> dict[str, Any]:
    """The names a card template may use (``suggestions``: the ids of the suggestions offered)."""
    zone = rule.display_zone
    return {
        "suggestions": list(offered),
        "patient_id": decision.patient,
        "as_of": decision.as_of,
        "severity": decision.severity,
        "escalators": [e["id"] for e in decision.escalators],
        "rule": {"id": rule.id, "version": rule.version, "title": rule.title},
        "params": {name: ParamView(p) for name, p in rule.parameters.items()},
        **{name: InputView(selection, zone) for name, selection in chosen.items()},
    }


def _render_value(value: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return render_text(value, context) if ("{{" in value or "{%" in value) else value
    if isinstance(value, list):
        return [_render_value(v, context) for v in value]
    if isinstance(value, dict):
        return {k: _render_value(v, context) for k, v in value.items()}
    return value


def render_card(
    rule: Rule, decision: Decision, chosen: Mapping[str, Selection], offered: Collection[str] | None = None
) -> dict[str, Any]:
    """The card for a firing decision, as a CDS Hooks card dict without ``uuid``. Empty members are omitted.

    ``offered``: the ids of the suggestions whose ``when`` holds (default: every suggestion)."""
    spec = rule.card
    suggestions = [s for s in spec.suggestions if offered is None or s.id in offered]
    context = template_context(rule, decision, chosen, [s.id for s in suggestions])
    summary = render_text(spec.summary, context)
    if len(summary) >= SUMMARY_LIMIT:  # odd data (a very long value) must not abort the evaluation
        summary = summary[: SUMMARY_LIMIT - 2].rstrip() + "…"
    label = spec.source.label
    if rule.site_profile:
        label += f" · site profile {rule.site_profile}"
    source: dict[str, Any] = {"label": label, "url": spec.source.url}
    if spec.source.topic:
        source["topic"] = spec.source.topic.model_dump()
    card: dict[str, Any] = {
        "summary": summary,
        "detail": render_text(spec.detail, context),
        "indicator": decision.severity,
        "source": source,
    }
    if suggestions:
        card["suggestions"] = [
            {
                "id": s.id,
                "label": render_text(s.label, context),
                **({"isRecommended": True} if s.is_recommended else {}),
                "actions": [
                    {
                        "type": a.type,
                        "description": render_text(a.description, context),
                        **({"resource": _render_value(a.resource, context)} if a.resource else {}),
                    }
                    for a in s.actions
                ],
            }
            for s in suggestions
        ]
        card["selectionBehavior"] = spec.selection_behavior
    if spec.override_reasons:
        card["overrideReasons"] = [c.model_dump() for c in spec.override_reasons]
    if spec.links:
        card["links"] = [{"label": link.label, "url": link.url, "type": link.type} for link in spec.links]
    return card
