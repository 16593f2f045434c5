"""``ehr-alerts replay``: files -> the real ingestion path -> Celery -> timeline -> alerts, then a summary."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from config.settings import get_settings
from service.ingest import Enqueuer, EntryOutcome, Ingested, ingest_items
from workers import inbox
from workers.pipeline import get_store
from workers.sources import expand_paths, read_items


def _wait_for_workers(timeout: float) -> bool:
    """Wait until every submitted batch is finished (real workers only)."""
    client = get_store().client
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if inbox.size(client) == 0:
            return True
        time.sleep(0.2)
    return False


def replay(paths: list[Path], console: Console, *, timeout: float = 600) -> Counter[str]:
    """Replay files in order through the pipeline and print what it did; returns the counter deltas."""
    settings = get_settings()
    store = get_store()
    before = Counter(store.counters())
    # Embedded mode processes each event as it arrives (batch of 1), exactly like a live feed; with real
    # workers events are batched and the per-patient clock and versions keep the result the same.
    enqueuer = Enqueuer(batch_size=1 if settings.redis_url is None else None)
    answer = Ingested()
    files = expand_paths(paths)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("replaying", total=len(files))
        for path in files:
            items = read_items(path)
            for item in items:
                if item.error is not None:
                    answer.entries.append(
                        EntryOutcome(item.origin, "rejected", None, [("error", item.origin, item.error)])
                    )
                    continue
                ingest_items([(item.origin, item.data)], enqueuer, answer)
            progress.advance(task)
    enqueuer.flush()
    if settings.redis_url is not None and not _wait_for_workers(timeout):
        console.print(f"[red]workers did not drain the queue within {timeout:.0f} s[/]")
    patients = enqueuer.patients
    delta = Counter(store.counters()) - before
    _summary(console, answer, delta, patients)
    return delta


def _summary(console: Console, answer: Ingested, delta: Counter[str], patients: set[str]) -> None:
    counts = answer.counts()
    console.print(
        f"events: {counts['accepted']} accepted, {counts['rejected']} rejected, {counts['ignored']} not used by the "
        f"rules; in the pipeline: {delta['events_stored']} stored, {delta['events_duplicate']} duplicate, "
        f"{delta['events_stale']} stale (older version), {delta['events_dead_lettered']} dead-lettered"
    )
    rules = sorted({k.split(":", 1)[1] for k in delta if k.startswith("alerts_") and ":" in k})
    table = Table("rule", "opened", "updated", "resolved", "retracted", "per 1,000 patients")
    n = max(len(patients), 1)
    for rule in rules:
        opened = delta[f"alerts_opened:{rule}"]
        table.add_row(
            rule,
            str(opened),
            str(delta[f"alerts_updated:{rule}"]),
            str(delta[f"alerts_resolved:{rule}"]),
            str(delta[f"alerts_retracted:{rule}"]),
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
