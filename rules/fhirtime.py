"""FHIR date/dateTime/instant handling: everything becomes an aware UTC datetime."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from functools import cache, lru_cache
from zoneinfo import ZoneInfo

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def to_utc(value: datetime | date | str | None) -> datetime | None:
    """Convert a FHIR date, dateTime or instant to an aware UTC datetime.

    Partial dates (``2013``, ``2013-04``, ``2013-04-02``) map to the start of the period; a naive
    datetime is taken as UTC (FHIR requires an offset whenever a time is given).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return parse_time(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:59:59-05:00 is after the last representable UTC instant
            return (datetime.max if value.year > 1 else datetime.min).replace(tzinfo=UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)


#: Dates from this year on are placeholders for "no planned end" (9999-12-31), never clinical times.
OPEN_ENDED_YEAR = 9000


def is_placeholder(value: datetime | None) -> bool:
    """True for a placeholder date such as 9999-12-31 (any year >= 9000)."""
    return value is not None and value.year >= OPEN_ENDED_YEAR


def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 / FHIR time string; raise ValueError with the offending text."""
    text = text.strip()
    match = _PARTIAL.match(text)
    if match:
        year, month, day = match.groups()
        return datetime(int(year), int(month or 1), int(day or 1), tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"not a FHIR dateTime: {text!r}") from exc
    return to_utc(parsed)  # type: ignore[return-value]


@lru_cache(maxsize=65_536)  # pure, and called for the same instants over and over while explaining decisions
def isoformat(value: datetime | None) -> str | None:
    """Render a UTC datetime as FHIR instant text (``2024-05-01T08:00:00Z``)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def hours(n: float) -> timedelta:
    """A timedelta of ``n`` hours."""
    return timedelta(hours=n)


#: How card text shows an instant: the month named and the zone abbreviation always given, so a time is never
#: ambiguous across a daylight-saving change nor between day-month and month-day readers (as config.localtime).
LOCAL_FORMATS = {"date": "%d %b %Y %H:%M %Z", "short": "%d %b %H:%M %Z"}


@cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=65_536)
def local_text(value: datetime, zone: str, style: str = "date") -> str:
    """An instant as card text shows it in the display time zone ``zone`` (``31 Mar 2024 03:30 CEST``)."""
    return value.astimezone(_zone(zone)).strftime(LOCAL_FORMATS[style])
