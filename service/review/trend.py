"""The K and Mg trend charts of the alert detail: inline SVG that cannot mislead.

Fixed axes per analyte and unit with round ticks (``charts.yaml``), the rule's threshold as a labelled dashed
line, Mg in the site's unit (``EHR_ALERTS_DISPLAY_MG_UNIT``), labels at 12 px drawn 1:1 (the chart is never
scaled down), and every point focusable with its value and local time shown on hover or keyboard focus.
No JavaScript; a screen reader reads the chart's label, which lists every point.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from html import escape
from pathlib import Path
from typing import Any

import yaml

from config.localtime import format_instant, to_local
from rules.catalog import Catalog
from rules.facts import format_decimal
from rules.units import analyte_units, unit_key
from workers.state.review_index import epoch

WIDTH, HEIGHT = 480, 160
LEFT, RIGHT, TOP, BOTTOM = 44, 14, 12, 24
FONT = 12  # px; the chart is drawn at its own size, so this is what is read (>= 11 px)


@dataclass(frozen=True)
class ChartSpec:
    """What one chart draws: analyte, unit, axis ticks and the threshold line (value in ``unit``, label)."""

    concept: str
    label: str
    unit: str
    ticks: tuple[float, ...]
    threshold: tuple[float, str] | None


@cache
def _config() -> dict[str, Any]:
    with (Path(__file__).with_name("charts.yaml")).open(encoding="utf-8") as handle:
        return dict(yaml.safe_load(handle))


def to_unit(concept: str, canonical: float | Decimal, unit: str) -> float:
    """A value in the analyte's canonical unit expressed in ``unit`` (units.yaml: canonical = reported x factor)."""
    factor = analyte_units(concept).factor(unit)
    if factor is None:
        raise ValueError(f"{unit!r} is not a {concept} unit")
    return float(Decimal(str(canonical)) / factor)


def chart_spec(concept: str, unit: str, catalog: Catalog) -> ChartSpec:
    """The chart of ``concept`` in ``unit``; the threshold comes from the rule file named in charts.yaml."""
    entry = _config()[concept]
    axes = entry["axes"]
    axis = next((a for name, a in axes.items() if unit_key(name) == unit_key(unit)), None)
    if axis is None:
        raise ValueError(f"charts.yaml has no {concept} axis in {unit!r} (has {sorted(axes)})")
    threshold = None
    source = entry.get("threshold")
    rule = catalog.get(source["rule"]) if source else None
    param = rule.parameters.get(source["parameter"]) if rule and source else None
    if param is not None and param.value is not None and source:
        same = [e.value for e in param.equivalents if unit_key(e.unit) == unit_key(unit)]
        if unit_key(param.unit) == unit_key(unit):
            value = float(param.value)
        elif same:
            value = float(same[0])
        else:
            value = to_unit(concept, param.value, unit)
        threshold = (value, str(source.get("label") or "threshold"))
    return ChartSpec(concept, str(entry["label"]), unit, tuple(float(t) for t in axis["ticks"]), threshold)


def _axis(ticks: tuple[float, ...], values: list[float]) -> list[float]:
    """The ticks, widened by whole steps until every value fits."""
    step = ticks[1] - ticks[0]
    out = list(ticks)
    while values and min(values) < out[0]:
        out.insert(0, round(out[0] - step, 6))
    while values and max(values) > out[-1]:
        out.append(round(out[-1] + step, 6))
    return out


def point_text(point: dict[str, Any], spec: ChartSpec, zone: str | None = None) -> str:
    """``1.5 mg/dL (lab: 0.62 mmol/L), 12 Mar 2024 08:00 CET``: value in the chart's unit, the lab's own
    value when it differs, local time."""
    shown = f"{format_decimal(Decimal(str(round(to_unit(spec.concept, point['value'], spec.unit), 2))))} {spec.unit}"
    reported = point.get("reported")
    if reported and reported.replace(" ", "") != shown.replace(" ", ""):
        shown += f" (lab: {reported})"
    return f"{shown}, {format_instant(point.get('time'), zone)}"


def render_chart(points: list[dict[str, Any]], start: str, end: str, spec: ChartSpec, zone: str | None = None) -> str:
    """The SVG of ``points`` (values in the canonical unit, oldest first) between ``start`` and ``end``."""
    values = [to_unit(spec.concept, p["value"], spec.unit) for p in points]
    ticks = _axis(spec.ticks, values + ([spec.threshold[0]] if spec.threshold else []))
    low, high = ticks[0], ticks[-1]
    t0, t1 = epoch(start), epoch(end)
    span = max(t1 - t0, 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(time: str | None) -> float:
        return LEFT + plot_w * min(max((epoch(time) - t0) / span, 0.0), 1.0)

    def y(value: float) -> float:
        return TOP + plot_h * (high - value) / (high - low)

    label = f"{spec.label} ({spec.unit}), {format_instant(start, zone, 'date')} to {format_instant(end, zone, 'date')}"
    if points:
        label += ": " + "; ".join(point_text(p, spec, zone) for p in points)
    else:
        label += ": no results in this window"
    parts = [
        f'<svg class="trend" role="group" aria-label="{escape(label)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" font-size="{FONT}">'
    ]
    for tick in ticks:
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>')
        shown = format_decimal(Decimal(str(tick)))
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{shown}</text>')
    parts += _day_marks(t0, t1, x, zone)
    if spec.threshold:
        value, name = spec.threshold
        ty = y(value)
        parts.append(f'<line class="threshold" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{ty:.1f}" y2="{ty:.1f}"/>')
        parts.append(
            f'<text class="threshold-label" x="{LEFT + 6}" y="{ty - 5:.1f}">'
            f"{escape(name)} &lt; {format_decimal(Decimal(str(value)))} {escape(spec.unit)}</text>"
        )
    unit_x = WIDTH - RIGHT - 4
    parts.append(
        f'<text class="unit" x="{unit_x}" y="{TOP - 2 + FONT / 2:.1f}" text-anchor="end">{escape(spec.unit)}</text>'
    )
    if not points:
        parts.append(
            f'<text class="empty" x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" text-anchor="middle">'
            f"no {escape(spec.label.lower())} results in this window</text>"
        )
    coords = [(x(p.get("time")), y(v)) for p, v in zip(points, values, strict=True)]
    if len(coords) > 1:
        parts.append(f'<polyline points="{" ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)}" fill="none"/>')
    for (cx, cy), point in zip(coords, points, strict=True):
        parts.append(_point(cx, cy, point_text(point, spec, zone), spec))
    parts.append("</svg>")
    return "".join(parts)


def _day_marks(t0: float, t1: float, x: Any, zone: str | None) -> list[str]:
    """Local-midnight grid lines, with at most five date labels."""
    if t1 <= t0:
        return []
    first = to_local(datetime.fromtimestamp(t0, UTC), zone)
    day = first.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    days = []
    while day.timestamp() <= t1:
        days.append(day)
        day = (day + timedelta(hours=26)).replace(hour=0)  # DST-safe step to the next local midnight
    every = max(1, -(-len(days) // 5))
    out = []
    for i, moment in enumerate(days):
        stamp = moment.isoformat()
        cx = x(stamp)
        out.append(f'<line class="day" x1="{cx:.1f}" x2="{cx:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>')
        if i % every == 0:
            day_label = moment.strftime("%d %b")
            out.append(f'<text class="tick" x="{cx:.1f}" y="{HEIGHT - 6}" text-anchor="middle">{day_label}</text>')
    return out


def _point(cx: float, cy: float, text: str, spec: ChartSpec) -> str:
    """A focusable point whose value and time appear beside it on hover or focus."""
    width = 7 * len(text) + 12
    tx = min(max(cx - width / 2, 2), WIDTH - width - 2)
    ty = cy - 30 if cy > TOP + 34 else cy + 10
    return (
        f'<g class="pt" tabindex="0" role="img" aria-label="{escape(spec.label)} {escape(text)}">'
        f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4.5"/>'
        f'<g class="tip" aria-hidden="true"><rect x="{tx:.1f}" y="{ty:.1f}" width="{width}" height="20" rx="3"/>'
        f'<text x="{tx + 6:.1f}" y="{ty + 14:.1f}">{escape(text)}</text></g></g>'
    )
