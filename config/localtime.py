"""Times as people read them: an instant shown in the site's display time zone (``EHR_ALERTS_DISPLAY_TIMEZONE``).

Data, APIs' machine fields and exports stay ISO 8601 UTC; only text meant for people goes through here (the
review page, the review API's display fields, card text). The format names the month and always carries
the zone abbreviation, so a time is never ambiguous across a daylight-saving change (01:30 CET and 01:30
CEST are an hour apart) nor between day-month and month-day readers.

    >>> format_instant("2024-03-31T00:30:00Z", "Europe/Berlin")
    '31 Mar 2024 01:30 CET'
    >>> format_instant("2024-03-31T01:30:00Z", "Europe/Berlin")
    '31 Mar 2024 03:30 CEST'
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import Literal
from zoneinfo import ZoneInfo

from config.settings import get_settings

Style = Literal["datetime", "short", "date", "time"]
_FORMATS: dict[str, str] = {
    "datetime": "%d %b %Y %H:%M %Z",  # 31 Mar 2024 03:30 CEST
    "short": "%d %b %H:%M",  # 31 Mar 03:30 (tables, where the zone is stated once on the page)
    "date": "%d %b %Y",
    "time": "%H:%M %Z",
}


@cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def display_zone(name: str | None = None) -> ZoneInfo:
    """The display time zone: ``name``, else the configured ``display_timezone``."""
    return _zone(name or get_settings().display_timezone)


def parse_instant(value: str | datetime) -> datetime:
    """An aware datetime from an ISO text (``Z`` or an offset; no zone is read as UTC) or a datetime."""
    if isinstance(value, datetime):
        moment = value
    else:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def to_local(value: str | datetime, zone: str | None = None) -> datetime:
    """The instant in the display zone."""
    return parse_instant(value).astimezone(display_zone(zone))


def format_instant(value: str | datetime | None, zone: str | None = None, style: Style = "datetime") -> str:
    """An instant as people read it in the display zone (``—`` when missing or unreadable).

    Styles: ``datetime`` (31 Mar 2024 03:30 CEST), ``short`` (31 Mar 03:30), ``date``, ``time`` (03:30 CEST).
    """
    if value is None or value == "":
        return "—"
    try:
        local = to_local(value, zone)
    except (ValueError, TypeError):
        return "—"
    return local.strftime(_FORMATS[style])


def zone_label(zone: str | None = None, at: datetime | None = None) -> str:
    """``Europe/Berlin (CEST)``: the zone's name and its abbreviation at ``at`` (default now)."""
    tz = display_zone(zone)
    moment = (at or datetime.now(UTC)).astimezone(tz)
    return f"{tz.key} ({moment.strftime('%Z')})" if tz.key != "UTC" else "UTC"
