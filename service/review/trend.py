"""The K/Mg trend as a small inline SVG (no JavaScript, readable with a screen reader via its title)."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

from workers.state.review_index import epoch

WIDTH, HEIGHT, PAD = 300, 90, 24


def sparkline(points: list[dict[str, Any]], start: str, end: str, label: str) -> str:
    """An SVG line chart of ``points`` (value in the canonical unit) between ``start`` and ``end``."""
    title = escape(_title(points, label))
    if not points:
        return (
            f'<svg class="trend" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">'
            f"<title>{title}</title>"
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no {escape(label)} results</text></svg>'
        )
    t0, t1 = epoch(start), epoch(end)
    values = [float(p["value"]) for p in points]
    low, high = min(values), max(values)
    if high - low < 1e-9:
        pad = max(abs(high) * 0.1, 0.1)
        low, high = low - pad, high + pad
    span_t = max(t1 - t0, 1.0)

    def x(p: dict[str, Any]) -> float:
        return PAD + (WIDTH - 2 * PAD) * min(max((epoch(p["time"]) - t0) / span_t, 0.0), 1.0)

    def y(v: float) -> float:
        return HEIGHT - PAD + 6 - (HEIGHT - 2 * PAD) * (v - low) / (high - low)

    coords = [(x(p), y(v)) for p, v in zip(points, values, strict=True)]
    anchor = "end" if coords[-1][0] > WIDTH / 2 else "start"
    label_x = coords[-1][0] - 4 if anchor == "end" else coords[-1][0] + 4
    path = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
    unit = escape(points[-1].get("unit") or "")
    dots = "".join(
        f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3"><title>{escape(_point_text(p))}</title></circle>'
        for (cx, cy), p in zip(coords, points, strict=True)
    )
    return (
        f'<svg class="trend" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">'
        f"<title>{title}</title>"
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD + 6}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD + 6}"/>'
        f'<text x="2" y="{y(high) + 4:.1f}" class="tick">{high:.2f}</text>'
        f'<text x="2" y="{y(low) + 4:.1f}" class="tick">{low:.2f}</text>'
        f'<text x="{label_x:.1f}" y="{max(coords[-1][1] - 6, 10):.1f}" text-anchor="{anchor}" class="last">'
        f"{values[-1]:.2f}</text>"
        f'<text x="{WIDTH - 2}" y="12" text-anchor="end" class="tick">{unit}</text>'
        f'<text x="{PAD}" y="{HEIGHT - 2}" class="tick">{escape(_day(start))}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 2}" text-anchor="end" class="tick">{escape(_day(end))}</text>'
        f'<polyline points="{path}" fill="none"/>{dots}</svg>'
    )


def _day(text: str) -> str:
    return datetime.fromtimestamp(epoch(text), UTC).strftime("%d %b") if epoch(text) else ""


def _point_text(point: dict[str, Any]) -> str:
    shown = point.get("reported") or f"{point['value']:g} {point.get('unit') or ''}"
    return f"{shown} at {(point.get('time') or '')[:16].replace('T', ' ')} UTC"


def _title(points: list[dict[str, Any]], label: str) -> str:
    if not points:
        return f"{label}: no results in the window"
    return f"{label} trend: " + "; ".join(_point_text(p) for p in points)
