"""Backfill benchmark: a measured 100,000-event historical extract through the real path, extrapolated to 1 million.

Everything runs for real: a private ``redis-server`` on a free port and the ehr-alerts Celery workers (prefork, 2
processes by default) as subprocesses. The extract is ``bench/stream_data.py`` with longer stays: 8,000 patients,
K every 8-24 h on a random walk, Mg, QTc, loop / thiazide diuretics, K and Mg products and other drugs (all
without an end date: open-ended), arrhythmia and unrelated conditions, corrected results. It is written as an
ndjson file and goes the way ``ehr-alerts replay`` takes it (``service.replay``):

1. **ingest**: read, validate (``fhir.resources``) and normalise every resource with the ingestion code
   (``service.ingest``), in this process; the first ``--events`` events in feed order are kept;
2. **enqueue + drain**: the feed clock is declared (the due sweep waits, as in a replay), each event is queued
   through the ingestion ``Enqueuer`` (inbox batches of 200 + a Celery doorbell each) in the order the live feed
   recorded them, while the workers consume; timed until the inbox is empty. Processed counts are sampled every
   half second, so the rate over the first and the second half of the events can be compared (a rate that
   falls with the volume already stored would make a linear extrapolation optimistic);
3. **settle**: as the replay does at the end of a feed, time runs to the feed's end for the patients due;
4. **retention**: every patient's time runs 400 days on, past the retention of labs (30 days), ended
   medications, open-ended medications (365 days after their start or last update) and encounters (active
   conditions without an end are kept by policy, forever): (a) by time alone, one tick per patient through the
   same inbox (what the due sweep does); (b) by one new event per patient 400 days on (a normal potassium),
   which moves the patient's clock, so the store prunes what has expired (bounded per call).

Redis memory: ``INFO memory`` ``used_memory`` before the backfill, after it and after retention, divided by the
patients; the patient keys by kind (``MEMORY USAGE``) and the global indexes (``resources:patient``,
``alerts:patient``, ``alerts:index``), which are not per patient.

Run from the repository root::

    .venv/bin/python bench/bench_backfill.py            # 100,000 events, ~10 min; bench/results/backfill.json
    .venv/bin/python bench/bench_backfill.py --quick    # 5,000 events, ~1 min smoke; backfill-quick.json
    .venv/bin/python bench/bench_backfill.py --events 50000 --patients 4000 --workers 2 --output /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    RESULTS_DIR,
    Bench,
    cpu_per_item,
    ensure_path,
    git_commit,
    machine,
    memory_per_patient,
    stamp,
)

ensure_path()
RETENTION_DAYS = 400  # past every retention but that of active conditions (kept while active)
MILLION = 1_000_000


def normal_k(patient: str, at: Any) -> dict[str, Any]:
    """A normal potassium result (4.2 mmol/L) for ``patient`` at ``at``."""
    from stream_data import probe

    resource = probe(patient, at)
    resource["id"] = f"{patient}-late"
    resource["valueQuantity"]["value"] = 4.2
    return resource


def used_memory(bench: Bench) -> int:
    return int(bench.client.info("memory")["used_memory"])


def global_indexes(bench: Bench) -> dict[str, Any]:
    """Entries and bytes of the global (not per patient) keys."""
    from workers.state import keys

    out = {}
    for name, key in (
        ("resources:patient", keys.resource_patients()),
        ("alerts:patient", keys.alert_patients()),
        ("alerts:index", keys.alert_index()),
        ("due:patients", keys.due_patients()),
    ):
        kind = bench.client.type(key)
        entries = {"hash": bench.client.hlen, "zset": bench.client.zcard, "set": bench.client.scard}.get(kind)
        out[name] = {"entries": entries(key) if entries else 0, "bytes": bench.client.memory_usage(key) or 0}
    return out


def processed(store: Any) -> int:
    counts = store.counters()
    return (
        int(counts.get("events_stored", 0))
        + int(counts.get("events_duplicate", 0))
        + int(counts.get("events_stale", 0))
    )


def drain(bench: Bench, store: Any, submit: Any, total: int) -> dict[str, Any]:
    """Run ``submit`` (queues the events) while the workers consume; sample progress until the inbox is empty."""
    from workers import inbox

    base = processed(store)
    cpu = bench.cpu_snapshot("real")
    load = stamp()
    start = time.perf_counter()
    submit()
    queued = time.perf_counter() - start
    samples = [(0.0, 0)]
    while True:
        done = processed(store) - base
        now = time.perf_counter() - start
        if samples[-1][1] != done:
            samples.append((now, done))
        if inbox.size(bench.client) == 0:
            break
        if bench.workers["real"].poll() is not None:
            raise SystemExit(f"workers exited; see {bench.logs}")
        time.sleep(0.5)
    seconds = time.perf_counter() - start
    cpu_after = bench.cpu_snapshot("real")
    done = processed(store) - base
    out: dict[str, Any] = {"events": done, "seconds": seconds, "enqueue_seconds": queued}
    if done:  # ticks are not events: a tick phase reports its time and CPU only
        half = next((t for t, n in samples if n >= done / 2), seconds)
        first, second = done / 2 / max(half, 1e-9), done / 2 / max(seconds - half, 1e-9)
        out |= {
            "events_per_s": done / seconds,
            "first_half_events_per_s": first,
            "second_half_events_per_s": second,
            "second_half_over_first": second / first,
            "cpu_us_per_event": cpu_per_item(cpu, cpu_after, done),
        }
    return {
        **out,
        "cpu_seconds": {k: round(cpu_after[k] - cpu[k], 2) for k in cpu},
        "expected_events": total,
        "load_start": load,
        "load_end": stamp(),
        "progress": [[round(t, 1), n] for t, n in samples[:: max(1, len(samples) // 60)]],
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 events (smoke)")
    parser.add_argument("--events", type=int, default=None, help="events to measure (default 100,000)")
    parser.add_argument("--patients", type=int, default=None, help="patients in the extract (default 8,000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--batch-size", type=int, default=200, help="EHR_ALERTS_BATCH_SIZE")
    parser.add_argument("--no-retention", action="store_true", help="skip the retention phase")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    target = args.events or (5_000 if args.quick else 100_000)
    patients = args.patients or (400 if args.quick else 8_000)
    output = args.output or RESULTS_DIR / ("backfill-quick.json" if args.quick else "backfill.json")

    from stream_data import generate

    results: dict[str, Any] = {"start": stamp(), "code": git_commit()}
    feed = generate(patients, stay_hours=(72, 264))
    logs = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    extract = logs / "extract.ndjson"
    with extract.open("w", encoding="utf-8") as f:
        for resource in feed:
            f.write(json.dumps(resource, separators=(",", ":")) + "\n")
    bench = Bench(logs, args.batch_size)
    try:
        from rich.console import Console

        from config.settings import get_settings
        from service.ingest import Enqueuer
        from service.replay import collect, feed_order
        from workers import due
        from workers.pipeline import get_store
        from workers.state import keys

        settings = get_settings()
        store = get_store()
        bench.start_workers(args.workers, "real")
        quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - for the run
        # warm-up: imports, the rule catalog's self-test, connections (its patients are forgotten after)
        warm = logs / "warmup.ndjson"
        warm.write_text("\n".join(json.dumps(r) for r in generate(20, seed=1, prefix="warmup")), encoding="utf-8")
        collector, _ = collect([warm], quiet)
        enqueuer = Enqueuer()
        for event in feed_order(collector.events):
            enqueuer.add(event)
        enqueuer.flush()
        bench.wait_idle(inbox_too=True)
        bench.forget_patients("warmup-*")
        memory_before = used_memory(bench)

        # 1. ingest: validate + normalise (this process)
        load = stamp()
        cpu0, t0 = time.process_time(), time.perf_counter()
        collector, answer = collect([extract], quiet)
        events = feed_order(collector.events)[:target]
        ingest = {
            "resources_read": len(answer.entries),
            "outcomes": dict(answer.counts()),
            "events_kept": len(events),
            "seconds": time.perf_counter() - t0,
            "cpu_us_per_event": round(1e6 * (time.process_time() - cpu0) / max(len(events), 1), 1),
            "load_start": load,
            "load_end": stamp(),
        }
        ingest["events_per_s"] = len(events) / ingest["seconds"]
        backfill_patients = {e.patient for e in events}
        feed_end = max(e.received for e in events if e.received)
        print(f"ingest: {len(events):,} events of {len(backfill_patients):,} patients in {ingest['seconds']:.1f} s")

        # 2. enqueue + drain; the feed clock is declared for the whole run (``Bench``), as ehr-alerts replay does
        def submit() -> None:
            enqueuer = Enqueuer()
            for event in events:
                enqueuer.add(event)
            enqueuer.flush()

        run = drain(bench, store, submit, len(events))
        print(
            f"drain: {run['events']:,} events in {run['seconds']:.1f} s = {run['events_per_s']:,.0f}/s "
            f"(halves {run['first_half_events_per_s']:,.0f} -> {run['second_half_events_per_s']:,.0f}/s)",
            flush=True,
        )
        # 3. settle: time runs to the end of the feed for the patients due (replay's last step)
        due_now = due.due_by(store.client, feed_end)
        settle = drain(bench, store, lambda: due.submit_ticks(store.client, due_now, feed_end, settings), 0)
        settle["patients_ticked"] = len(due_now)
        counters = Counter(store.counters())
        memory_end = used_memory(bench)
        keys_end = memory_per_patient(bench, "bp-*")
        indexes_end = global_indexes(bench)

        retention: dict[str, Any] | None = None
        if not args.no_retention:
            later = feed_end + timedelta(days=RETENTION_DAYS)
            everyone = sorted(backfill_patients)

            def state() -> dict[str, Any]:
                sample = everyone[:2000]
                return {
                    "used_memory_bytes": used_memory(bench),
                    "used_memory_delta_per_patient": round((used_memory(bench) - memory_before) / len(everyone)),
                    "patient_keys": memory_per_patient(bench, "bp-*"),
                    "global_indexes": global_indexes(bench),
                    "facts_per_patient": round(
                        sum(bench.client.hlen(keys.patient_keys(p)["facts"]) for p in sample) / len(sample), 2
                    ),
                }

            # a. time alone: one tick per patient (what the due sweep would do; a tick does not move the stored clock)
            ticks = drain(bench, store, lambda: due.submit_ticks(store.client, everyone, later, settings), 0)
            after_ticks = state()
            # b. one new result per patient 400 days on (a normal K): the event moves the clock, the store prunes
            late = logs / "late.ndjson"
            late.write_text(
                "\n".join(json.dumps(normal_k(p, later)) for p in everyone) + "\n",
                encoding="utf-8",
            )
            collector, _ = collect([late], quiet)
            late_events = feed_order(collector.events)

            def submit_late() -> None:
                enqueuer = Enqueuer()
                for event in late_events:
                    enqueuer.add(event)
                enqueuer.flush()

            late_run = drain(bench, store, submit_late, len(late_events))
            retention = {
                "time_run_to": later.isoformat(),
                "a_ticks_only": {"run": ticks, **after_ticks},
                "b_one_new_event_each": {"run": late_run, **state()},
            }
    finally:
        bench.close()

    n = len(backfill_patients)
    rate = run["events_per_s"]
    slower_half = min(run["first_half_events_per_s"], run["second_half_events_per_s"])
    results.update(
        {
            "end": stamp(),
            "machine": machine(),
            "workload": {
                "patients": n,
                "events": len(events),
                "resources_generated": len(feed),
                "by_type": dict(Counter(r["resourceType"] for r in feed)),
                "stay_hours": [72, 264],
                "worker_processes": args.workers,
                "batch_size": args.batch_size,
            },
            "ingest": ingest,
            "drain": run,
            "settle": settle,
            "alerts": {k: v for k, v in counters.items() if k.startswith("alerts_") and ":" not in k},
            "memory": {
                "used_memory_before_bytes": memory_before,
                "used_memory_end_bytes": memory_end,
                "used_memory_delta_per_patient": round((memory_end - memory_before) / n),
                "patient_keys": keys_end,
                "global_indexes": indexes_end,
            },
            "retention": retention,
            "extrapolation_1m": {
                "method": "linear in events from the measured rates (drain: the slower of the two halves); "
                "patients grow with events (same events per patient)",
                "ingest_hours": round(MILLION / ingest["events_per_s"] / 3600, 2),
                "drain_hours": round(MILLION / slower_half / 3600, 2),
                "drain_hours_at_whole_run_rate": round(MILLION / rate / 3600, 2),
                "total_hours_ingest_then_drain": round(
                    (MILLION / ingest["events_per_s"] + MILLION / slower_half) / 3600, 2
                ),
                "patients": round(n * MILLION / len(events)),
                "redis_used_memory_gb": round((memory_end - memory_before) / n * n * MILLION / len(events) / 1e9, 2),
            },
        }
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in results.items() if k not in ("drain", "settle", "retention")}, indent=2))
    print(f"written to {output}; logs in {logs}")


if __name__ == "__main__":
    main()
