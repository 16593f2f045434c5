"""Stream benchmark: the real workers draining the real stream, against a bare Celery no-op task.

Everything runs for real on this machine: a private ``redis-server`` on a free port, the API (uvicorn, one
process) and Celery workers (prefork, 1 and 2 processes) as subprocesses. The feed is
``bench/stream_data.py``: a few thousand synthetic patients (labs, medications, conditions; codes from the
packaged value sets; seeded).

Per worker count, in rounds (the machine is shared and noisy, so each round measures both back to back):

* ``noop`` (baseline): a **bare** Celery app (``bench/bare_celery.py``: no project import, so no JSON logging,
  signals or bootsteps; the project's broker, serializer, late acks and prefetch settings) with one no-op
  task per event (the raw resource as its argument). The tasks are published first, by a separate process,
  while the bare workers are frozen (SIGSTOP); the drain is timed from SIGCONT until the queue and the
  unacked hash are empty.
* ``stream``: the feed as ndjson ``POST /fhir/$import`` requests, validated and normalised by the API and
  batched through the inbox (the real ingestion enqueue path), while the real ehr-alerts workers are frozen;
  then the workers are let go and the drain is timed until every batch is finished (``process_batch``:
  timelines, rules, alerts, in the private Redis).

Publishing never overlaps the measured drain, and each drain is CPU of the worker process group (``/proc``)
and of Redis. The figure that matters is **stream events/s / noop tasks/s** of the same round: events processed
in the time of one bare no-op task (target >= 5).

Then, on the state left by the 2-process run: Redis memory per patient (``MEMORY USAGE`` of every patient
key, by key kind), and the p99 event-to-alert latency of the whole path (API and workers sharing the cores) at
a paced rate: each small request carries one probe patient's low potassium that opens an alert at once;
latency = time the worker indexed the alert - time the request was sent.

Run from the repository root::

    .venv/bin/python bench/bench_stream.py            # ~15 min on a shared 2-core machine; bench/results/stream.json
    .venv/bin/python bench/bench_stream.py --quick    # ~1 min smoke, writes bench/results/stream-quick.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BARE_QUEUE,
    BENCH,
    BIN,
    RESULTS_DIR,
    Bench,
    Profiler,
    cpu_per_item,
    ensure_path,
    git_commit,
    machine,
    memory_per_patient,
    ndjson_bodies,
    pool_children,
    post_all,
    stamp,
    top_frames,
)

ensure_path()


def run_noop(bench: Bench, feed_file: Path, tasks: int) -> dict[str, Any]:
    """The baseline: ``tasks`` bare no-op tasks published while the bare workers are frozen, then drained."""
    bench.freeze("bare")
    published = time.perf_counter()
    out = subprocess.run(
        [str(BIN / "python"), str(BENCH / "bare_celery.py"), "publish", str(feed_file)],
        env=bench.bare_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    publish_seconds = time.perf_counter() - published
    if int(out.stdout.strip()) != tasks:
        raise SystemExit(f"published {out.stdout.strip()} no-op tasks, expected {tasks}")
    load = stamp()
    cpu = bench.cpu_snapshot("bare")
    start = time.perf_counter()
    bench.thaw("bare")
    end = bench.wait_idle(queue=BARE_QUEUE, inbox_too=False)
    cpu_after = bench.cpu_snapshot("bare")
    bench.freeze("bare")
    return {
        "tasks": tasks,
        "seconds": end - start,
        "per_s": tasks / (end - start),
        "publish_seconds": publish_seconds,
        "cpu_us_per_task": {k: v for k, v in cpu_per_item(cpu, cpu_after, tasks).items() if k != "client"},
        "load_start": load,
        "load_end": stamp(),
    }


def run_stream(bench: Bench, bodies: list[bytes], profiler: Profiler | None = None) -> dict[str, Any]:
    """The feed ingested over HTTP while the real workers are frozen, then drained; checks nothing was lost.
    With ``profiler``, py-spy samples the worker processes during the drain (not a measured drain then)."""
    from workers.pipeline import get_store

    store = get_store()
    before = Counter(store.counters())
    bench.freeze("real")
    cpu = bench.cpu_snapshot("real")
    posted = time.perf_counter()
    outcomes = post_all(bench, bodies)
    post_seconds = time.perf_counter() - posted
    cpu_posted = bench.cpu_snapshot("real")
    events = outcomes["events"]
    load = stamp()
    start = time.perf_counter()
    bench.thaw("real")
    if profiler is not None:
        profiler.attach(pool_children(bench.workers["real"].pid), "pool")
        profiler.attach([bench.workers["real"].pid], "main")
    end = bench.wait_idle(inbox_too=True)
    cpu_after = bench.cpu_snapshot("real")
    bench.freeze("real")
    delta = Counter(store.counters()) - before
    processed = delta["events_stored"] + delta["events_duplicate"] + delta["events_stale"]
    if processed != events or store.dead_letters():
        raise SystemExit(f"events lost or dead-lettered: queued {events}, processed {processed}")
    ingest_cpu = cpu_per_item(cpu, cpu_posted, events)
    return {
        "resources": sum(outcomes[k] for k in ("accepted", "ignored", "rejected")),
        "events": events,
        "rejected": outcomes["rejected"],
        "seconds": end - start,
        "events_per_s": events / (end - start),
        "cpu_us_per_event": {k: v for k, v in cpu_per_item(cpu_posted, cpu_after, events).items() if k != "client"},
        "ingest_seconds": post_seconds,
        "ingest_cpu_us_per_event": {"api": ingest_cpu["api"], "redis": ingest_cpu["redis"]},
        "rule_evaluations_per_event": round(
            sum(v for k, v in delta.items() if k.startswith("decisions_") and ":" not in k) / events, 2
        ),
        "alerts_opened": delta["alerts_opened"],
        "alerts_resolved": delta["alerts_resolved"],
        "alerts_updated": delta["alerts_updated"],
        "load_start": load,
        "load_end": stamp(),
    }


def run_paced(bench: Bench, resources: list[dict[str, Any]], rate: float, seconds: float) -> dict[str, Any]:
    """Feed ``rate`` events/s in small requests, each with one probe; p50/p99 event-to-alert latency."""
    import httpx
    from stream_data import T0, probe

    from workers.pipeline import get_store
    from workers.state import keys

    per_second = 50  # requests per second
    per_request = max(1, round(rate / per_second) - 1)
    requests = min(int(seconds * per_second), len(resources) // per_request)
    sent: dict[str, float] = {}
    load = stamp()
    with httpx.Client(timeout=60) as http:
        start = time.perf_counter()
        for i in range(requests):
            due = start + i / per_second
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            patient = f"probe-{i:05d}"
            body = [probe(patient, T0 + timedelta(days=3)), *resources[i * per_request : (i + 1) * per_request]]
            sent[patient] = time.time()
            response = http.post(
                f"{bench.base_url}/fhir/$import",
                content="\n".join(json.dumps(r) for r in body).encode(),
                headers=bench.feed_headers(),
            )
            if response.status_code != 202:
                raise SystemExit(f"paced request failed: {response.status_code}")
        elapsed = time.perf_counter() - start
    bench.wait_idle(inbox_too=True)
    store = get_store()
    latencies = []
    for patient, at in sent.items():
        alerts = store.alerts_for_patient(patient, open_only=True)
        if len(alerts) != 1:
            raise SystemExit(f"probe {patient}: expected one open alert, got {len(alerts)}")
        score = bench.client.zscore(keys.alert_index(), f"{patient}|{alerts[0]['id']}")
        latencies.append((score - at) * 1000)
    latencies.sort()
    return {
        "target_events_per_s": rate,
        "achieved_events_per_s": requests * (per_request + 1) / elapsed,
        "requests": requests,
        "events_per_request": per_request + 1,
        "probes": len(latencies),
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p90": round(latencies[int(0.90 * (len(latencies) - 1))], 1),
            "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 1),
            "max": round(latencies[-1], 1),
        },
        "load_start": load,
        "load_end": stamp(),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small feed, one round (smoke)")
    parser.add_argument("--patients", type=int, default=None, help="patients in the feed (default 2,500)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per worker count (default 2)")
    parser.add_argument("--chunk", type=int, default=500, help="ndjson lines per request")
    parser.add_argument("--batch-size", type=int, default=200, help="EHR_ALERTS_BATCH_SIZE for the API")
    parser.add_argument("--workers", default="1,2", help="worker process counts to measure")
    parser.add_argument("--paced-seconds", type=float, default=None, help="length of the latency run")
    parser.add_argument(
        "--paced-rate", type=float, default=None, help="events/s of the latency run (default: half the drain rate)"
    )
    parser.add_argument(
        "--py-spy",
        default=shutil.which("py-spy"),
        help="py-spy binary: after the rounds, one more (unmeasured) stream drain per worker count is profiled",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    patients = args.patients or (400 if args.quick else 2500)
    rounds = args.rounds or (1 if args.quick else 2)
    paced_seconds = args.paced_seconds or (5 if args.quick else 20)
    output = args.output or RESULTS_DIR / ("stream-quick.json" if args.quick else "stream.json")
    counts = [int(n) for n in args.workers.split(",")]

    from stream_data import generate

    results: dict[str, Any] = {"start": stamp(), "code": git_commit(), "runs": {}}
    feed = generate(patients)
    bodies = ndjson_bodies(feed, args.chunk)
    logs = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    feed_file = logs / "feed.json"
    feed_file.write_text(json.dumps(feed), encoding="utf-8")
    bench = Bench(logs, args.batch_size)
    try:
        bench.start_api()
        warmup = generate(20, seed=1, prefix="warmup")
        warm_file = logs / "warmup.json"
        warm_file.write_text(json.dumps(warmup), encoding="utf-8")
        for processes in counts:
            bench.start_workers(processes, "real")
            post_all(bench, ndjson_bodies(warmup, 100))  # imports, rule catalog self-test, connections
            bench.wait_idle(inbox_too=True)
            bench.start_workers(processes, "bare")
            run_noop(bench, warm_file, len(warmup))
            rounds_out = []
            for r in range(rounds):
                noop = run_noop(bench, feed_file, len(feed))
                bench.forget_patients("bp-*")
                stream = run_stream(bench, bodies)
                ratio = stream["events_per_s"] / noop["per_s"]
                cpu_ratio = noop["cpu_us_per_task"]["workers"] / stream["cpu_us_per_event"]["workers"]
                rounds_out.append({"noop": noop, "stream": stream, "ratio": ratio, "worker_cpu_ratio": cpu_ratio})
                print(
                    f"{processes} worker process(es), round {r + 1}: noop {noop['per_s']:,.0f} tasks/s, "
                    f"stream {stream['events_per_s']:,.0f} events/s, ratio {ratio:.2f} "
                    f"(worker CPU ratio {cpu_ratio:.2f}); CPU us per task / event: "
                    f"noop {noop['cpu_us_per_task']}, stream {stream['cpu_us_per_event']}; "
                    f"load {stream['load_end']['loadavg_1_5_15']}",
                    flush=True,
                )
            results["runs"][str(processes)] = {
                "rounds": rounds_out,
                "ratio_median": statistics.median(r["ratio"] for r in rounds_out),
                "worker_cpu_ratio_median": statistics.median(r["worker_cpu_ratio"] for r in rounds_out),
                "stream_events_per_s_median": statistics.median(r["stream"]["events_per_s"] for r in rounds_out),
                "noop_tasks_per_s_median": statistics.median(r["noop"]["per_s"] for r in rounds_out),
            }
            bench.stop_workers("bare")
            if args.py_spy:
                bench.forget_patients("bp-*")
                profiler = Profiler(args.py_spy, logs / f"profile-{processes}")
                profiler.out_dir.mkdir()
                profiled = run_stream(bench, bodies, profiler)
                files = profiler.stop()
                results["runs"][str(processes)]["profile"] = {
                    "events_per_s_while_sampled": profiled["events_per_s"],
                    "worker_cpu_us_per_event_while_sampled": profiled["cpu_us_per_event"]["workers"],
                    "pool_processes": top_frames([f for f in files if f.name.startswith("pool-")]),
                    "main_process": top_frames([f for f in files if f.name.startswith("main-")], limit=20),
                }
            if processes == max(counts):
                results["memory"] = memory_per_patient(bench)
                bench.forget_patients("bp-*")
                bench.thaw("real")
                rate = args.paced_rate or results["runs"][str(processes)]["stream_events_per_s_median"] / 2
                results["latency"] = {
                    "worker_processes": processes,
                    **run_paced(bench, feed, rate, paced_seconds),
                }
            bench.stop_workers("real")
    finally:
        bench.close()
    results["end"] = stamp()
    results["machine"] = machine()
    results["workload"] = {
        "patients": patients,
        "resources": len(feed),
        "by_type": dict(Counter(r["resourceType"] for r in feed)),
        "chunk_lines": args.chunk,
        "batch_size": args.batch_size,
        "client_threads": 2,
        "rounds": rounds,
    }
    results["target"] = {"ratio": 5.0, "met": all(run["ratio_median"] >= 5.0 for run in results["runs"].values())}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    for n, run in results["runs"].items():
        print(
            f"{n} worker process(es): stream {run['stream_events_per_s_median']:,.0f} events/s, bare noop "
            f"{run['noop_tasks_per_s_median']:,.0f} tasks/s, ratio {run['ratio_median']:.2f} "
            f"(worker CPU ratio {run['worker_cpu_ratio_median']:.2f}; median of rounds)"
        )
    print(f"written to {output}; logs in {logs}")


if __name__ == "__main__":
    main()
