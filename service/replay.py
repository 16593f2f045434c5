"""``ehr-alerts replay``: files -> the real ingestion path -> Celery -> timeline -> alerts, then a summary.

A replay declares the extract's own clock: its events are delivered in the order the live feed would have
delivered them (by the time each version was recorded: ``meta.lastUpdated`` when given, else its clinical
time), each received at that time, so one at a time or in batches the pipeline decides what it would have
decided live. While it runs, the workers' due sweep waits (``keys.feed_clock``); at the end the replay lets
time run to the end of the feed, so alerts whose evidence aged out before the extract ends are closed.
``--shift-to-now`` moves every time of the extract so its newest event is now (on by default for
``examples/stream``, so the worklist and a CDS Hooks call agree right after ``make demo``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from config.settings import get_settings
from service.ingest import Enqueuer, EntryOutcome, Ingested, ingest_items
from workers import due, inbox
from workers.events import Event
from workers.pipeline import get_store
from workers.sources import expand_paths, read_items
from workers.state import keys

EXAMPLE_STREAM = Path(__file__).resolve().parents[1] / "examples" / "stream"

#: Unfinished batches a replay leaves in the inbox before it waits for the workers (200 events each: seconds of
#: work, far below the redelivery timeout, so a queued batch is never re-published while it waits its turn).
REPLAY_BACKLOG = 20


class FeedCollector(Enqueuer):
    """Collects the extract's events (nothing is submitted) so they can be delivered in feed order."""

    def __init__(self) -> None:
        super().__init__(batch_size=1)
        self.events: list[Event] = []

    def accept(self, event: Event) -> str | None:
        """Keep the event; its receipt time is declared later, so nothing is 'in the future' here."""
        self.events.append(event)
        self.patients.add(event.patient)
        if event.kind == "resource":
            self.received[event.resource] = event.patient
        return None

    def add(self, event: Event) -> None:
        """A delete (or any event queued directly) is kept in its place too."""
        self.accept(event)

    def flush(self) -> None:
        """Nothing to submit: :func:`feed_order` delivers."""


class PacedEnqueuer(Enqueuer):
    """Submits batches no faster than the workers finish them: at most ``backlog`` unfinished batches in the
    inbox. Queuing a whole extract at once kept batches waiting longer than the redelivery timeout, so the
    inbox sweep re-published thousands of doorbells every period (bench/README.md, bench_backfill.py).
    Waits at most ``timeout`` seconds in all; after that (no worker consuming) it queues without waiting."""

    def __init__(self, backlog: int, timeout: float) -> None:
        super().__init__()
        self.backlog = backlog
        self.deadline = time.monotonic() + timeout
        self.stalled = False

    def flush(self) -> None:
        if self.pending and not self.stalled:
            self.stalled = not self._wait_for_room()
        super().flush()

    def _wait_for_room(self) -> bool:
        client = get_store().client
        while inbox.size(client) >= self.backlog:
            if time.monotonic() >= self.deadline:
                return False
            time.sleep(0.05)
        return True


def recorded_at(event: Event) -> datetime:
    """When the feed recorded this version: its ``meta.lastUpdated`` if later than its clinical time."""
    updated = [f.updated for f in event.facts if f.updated is not None]
    return max([event.event_time, *updated])


def feed_order(events: list[Event]) -> list[Event]:
    """The events in the order a live feed would have delivered them, each received when it was recorded.
    A delete keeps its place right after the event before it in the extract."""
    keyed: list[tuple[datetime, int, Event]] = []
    last = datetime.min.replace(tzinfo=UTC)
    for position, event in enumerate(events):
        key = last if event.is_delete else recorded_at(event)
        keyed.append((key, position, event))
        last = key
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [e.model_copy(update={"received": key}) for key, _, e in keyed]


def shift(events: list[Event], offset: timedelta) -> list[Event]:
    """Every time of the events moved by ``offset`` (facts included)."""

    def moved(value: datetime | None) -> datetime | None:
        return None if value is None else value + offset

    out = []
    for event in events:
        facts = [
            f.model_copy(update={"start": moved(f.start), "end": moved(f.end), "updated": moved(f.updated)})
            for f in event.facts
        ]
        update = {"facts": facts, "received": moved(event.received)}
        if not event.is_delete:
            update["event_time"] = moved(event.event_time)
        out.append(event.model_copy(update=update))
    return out


@dataclass
class FeedClock:
    """The feed's own clock while a replay runs: the workers' due sweep waits until it is cleared."""

    def __enter__(self) -> FeedClock:
        get_store().client.set(keys.feed_clock(), "replay")
        return self

    def __exit__(self, *exc: object) -> None:
        get_store().client.delete(keys.feed_clock())


def _wait_for_workers(timeout: float) -> bool:
    """Wait until every submitted batch is finished (real workers only)."""
    client = get_store().client
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if inbox.size(client) == 0:
            return True
        time.sleep(0.2)
    return False


def is_example_stream(paths: list[Path]) -> bool:
    """True when every path is (inside) the packaged example stream."""
    return bool(paths) and all(p.resolve().is_relative_to(EXAMPLE_STREAM) for p in paths)


def collect(paths: list[Path], console: Console) -> tuple[FeedCollector, Ingested]:
    """Read and validate every file through the ingestion code, collecting the events (nothing is submitted)."""
    collector = FeedCollector()
    answer = Ingested()
    files = expand_paths(paths)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("reading", total=len(files))
        for path in files:
            for item in read_items(path):
                if item.error is not None:
                    answer.entries.append(
                        EntryOutcome(item.origin, "rejected", None, [("error", item.origin, item.error)])
                    )
                    continue
                ingest_items([(item.origin, item.data)], collector, answer)
            progress.advance(task)
    return collector, answer


def replay(
    paths: list[Path],
    console: Console,
    *,
    timeout: float = 600,
    shift_to_now: bool | None = None,
    now: datetime | None = None,
) -> Counter[str]:
    """Replay files through the pipeline in feed order and print what it did; returns the counter deltas."""
    settings = get_settings()
    store = get_store()
    embedded = settings.redis_url is None
    before = Counter(store.counters())
    collector, answer = collect(paths, console)
    events = feed_order(collector.events)
    if shift_to_now is None:
        shift_to_now = is_example_stream(paths)
    if shift_to_now and events:
        offset = (now or datetime.now(UTC)) - max(e.received for e in events if e.received)
        events = shift(events, offset)
        console.print(
            f"times shifted by {offset.days} d {offset.seconds // 3600} h so the extract's newest event is now "
            "(--no-shift-to-now keeps the extract's own dates)"
        )
    # Embedded mode delivers one event at a time, exactly like a live feed; with real workers in batches,
    # which decide the same (workers.steps).
    enqueuer = Enqueuer(batch_size=1) if embedded else PacedEnqueuer(REPLAY_BACKLOG, timeout)
    feed_end = max((e.received for e in events if e.received), default=None)
    with FeedClock():
        for event in events:
            enqueuer.add(event)
        enqueuer.flush()
        if isinstance(enqueuer, PacedEnqueuer) and enqueuer.stalled:
            console.print(f"[red]workers did not keep up within {timeout:.0f} s: the rest was queued at once[/]")
        if not embedded and not _wait_for_workers(timeout):
            console.print(f"[red]workers did not drain the queue within {timeout:.0f} s[/]")
        if feed_end is not None:  # let time run to the end of the feed: evidence that aged out closes
            due.submit_ticks(store.client, due.due_by(store.client, feed_end), feed_end, settings)
            if not embedded:
                _wait_for_workers(timeout)
    delta = Counter(store.counters()) - before
    _summary(console, answer, delta, collector.patients, feed_end)
    return delta


def _summary(
    console: Console, answer: Ingested, delta: Counter[str], patients: set[str], feed_end: datetime | None
) -> None:
    counts = answer.counts()
    console.print(
        f"events: {counts['accepted']} accepted, {counts['rejected']} rejected, {counts['ignored']} not used by the "
        f"rules; in the pipeline: {delta['events_stored']} stored, {delta['events_duplicate']} duplicate, "
        f"{delta['events_stale']} stale (older version), {delta['events_dead_lettered']} dead-lettered"
    )
    if feed_end is not None:
        console.print(f"feed clock: events delivered in recorded order, time run to {feed_end:%Y-%m-%d %H:%M} UTC")
    rules = sorted({k.split(":", 1)[1] for k in delta if k.startswith("alerts_") and ":" in k})
    closings = ("resolved", "expired", "withdrawn", "retracted")
    table = Table("rule", "opened", "escalated", *closings, "per 1,000 patients")
    n = max(len(patients), 1)
    for rule in rules:
        opened = delta[f"alerts_opened:{rule}"]
        table.add_row(
            rule,
            str(opened),
            str(delta[f"alerts_escalated:{rule}"]),
            *(str(delta[f"alerts_{c}:{rule}"]) for c in closings),
            f"{1000 * opened / n:.1f}",
        )
    console.print(table if rules else "No alerts opened.")
    console.print(
        f"patients with relevant events: {len(patients)}; alert burden: "
        f"{1000 * delta['alerts_opened'] / n:.1f} alerts opened per 1,000 patients; "
        f"indeterminate decisions: {delta['decisions_indeterminate']}"
    )
    open_table = Table("patient", "rule", "severity", "status", "summary", show_lines=True)
    store = get_store()
    for patient in sorted(patients):
        for alert in store.alerts_for_patient(patient):
            open_table.add_row(
                patient,
                alert["rule_id"],
                alert["severity"] or "",
                alert["status"],
                alert["card"]["summary"] if alert.get("card") else "",
            )
    console.print(open_table)
    for entry in [e for e in answer.entries if e.outcome == "rejected"][:20]:
        console.print(f"[yellow]rejected[/] {entry.location}: {entry.issues[0][2] if entry.issues else ''}")
