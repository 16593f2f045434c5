"""Benchmark: per-event cost as one patient's history grows, and as one open alert is updated many times.

Drives the real ``workers.pipeline.process_batch`` against a private ``redis-server`` (started on a free port;
REDIS_URL is never used) and measures, per event, the worker's process CPU time (``time.process_time``) and the
Redis server's CPU (``INFO cpu`` used_cpu_user + used_cpu_sys deltas; ``INFO commandstats`` script time too).

* growth: a patient with N stored facts (N = 10, 100, 1,000, 5,000): potassium and magnesium results every 4 h
  and every 25th resource a furosemide MedicationStatement that ended, stored by the store's own script without
  evaluating them (not measured); then ``--events`` new potassium results, 4 h apart, one per batch (one event
  per Celery task, the worst case), measured. Every retention is set to 20 years so the timeline really holds N
  facts (with the default 30-day lab retention a lab every 4 h caps a timeline at 180 labs). Reported as ratios
  to the 10-fact figure of the same run, with the facts the store returned per event (the window).
* alert: 1,000 updates of one open alert (a low potassium every 8 h, each a new value, so the open
  hypokalemia-without-magnesium alert is updated with new evidence each time), after a week of normal results
  so the window is full from the first update; Redis CPU per event of the last 100 against the first 100, and
  the alert record's size after the first, the 100th and the last update.

``--before DIR``: also run both parts against another checkout (``git worktree add /tmp/before f962042``,
the code before the alert-lifecycle store change) in a subprocess with that tree first on ``sys.path`` (the
same ``process_batch(raw_events, store)`` API; its history stored with ``Store.upsert_many``), in the same run;
its sizes can be limited with ``--before-sizes``.

    .venv/bin/python bench/bench_growth.py                      # writes bench/results/growth.json
    .venv/bin/python bench/bench_growth.py --before /tmp/before
    .venv/bin/python bench/bench_growth.py --quick              # smoke, writes bench/results/growth-quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = Path(os.environ.get("BENCH_CODE_ROOT") or HERE.parents[1])
sys.path.insert(0, str(HERE.parents[1] / "tests"))  # FHIR builders (plain dicts)
sys.path.insert(0, str(ROOT))

from harness import free_port  # noqa: E402 - bench/ is on sys.path when run as a script

T0 = datetime(2024, 1, 1, tzinfo=UTC)
RETENTION_HOURS = str(24 * 365 * 20)
ENV = {
    "EHR_ALERTS_KEY_PREFIX": "bench",
    "EHR_ALERTS_RETENTION_LAB_HOURS": RETENTION_HOURS,
    "EHR_ALERTS_RETENTION_MEDICATION_HOURS": RETENTION_HOURS,
    "EHR_ALERTS_RETENTION_CONDITION_HOURS": RETENTION_HOURS,
    "EHR_ALERTS_RETENTION_OPEN_MEDICATION_HOURS": RETENTION_HOURS,
    "EHR_ALERTS_LOG_LEVEL": "WARNING",
}


def _start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if not binary:
        sys.exit("redis-server is not on PATH")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, url


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
    }


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _events(resources: list[dict[str, Any]], received: datetime) -> list[dict[str, Any]]:
    from rules.normalize import normalize_resource
    from workers.events import dump_batch, events_from

    events = [events_from(normalize_resource(r), received) for r in resources]
    return dump_batch([e for e in events if e is not None])


def _history(patient: str, n: int) -> list[tuple[dict[str, Any], datetime]]:
    """N resources 4 h apart ending at T0: K and Mg results (normal), every 25th an ended furosemide."""
    from fhir_builders import FUROSEMIDE, magnesium, med_statement, potassium

    out = []
    for i in range(n):
        at = T0 - timedelta(hours=4 * (n - i))
        if i % 25 == 24:
            res = med_statement(
                FUROSEMIDE, status="completed", start=_iso(at - timedelta(days=2)), end=_iso(at), patient=patient
            )
            res["id"] = f"h{i}"
        elif i % 2:
            res = magnesium(0.85, at=_iso(at), patient=patient, id=f"h{i}")
        else:
            res = potassium(4.2, at=_iso(at), patient=patient, id=f"h{i}")
        out.append((res, at + timedelta(minutes=30)))
    return out


def _store_only(store: Any, patient: str, history: list[tuple[dict[str, Any], datetime]], batch: int) -> None:
    """Store the history without evaluating it (the store's own script: ``TimelineStore.store_many`` here,
    ``Store.upsert_many`` before the alert-lifecycle change): what is measured is the events after it."""
    from workers.events import Event

    for start in range(0, len(history), batch):
        chunk = history[start : start + batch]
        events = [Event.model_validate(e) for e in _events([r for r, _ in chunk], chunk[-1][1])]
        if hasattr(store, "timelines"):
            [result] = store.timelines.store_many({patient: events}, 0.0).values()
        else:
            [result] = store.upsert_many({patient: events}).values()
        if isinstance(result, Exception):
            raise result


class Meter:
    """Worker process CPU and Redis server CPU / script time between two readings."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def read(self) -> tuple[float, float, float]:
        cpu = self.client.info("cpu")
        stats = self.client.info("commandstats")
        usec = sum(v.get("usec", 0) for k, v in stats.items() if k.startswith("cmdstat_eval"))
        return time.process_time(), cpu["used_cpu_user"] + cpu["used_cpu_sys"], usec / 1e6


def _run_events(process_batch: Any, store: Any, batches: list[list[dict[str, Any]]], meter: Meter) -> list[dict]:
    """Process each batch, returning per-batch (worker cpu, redis cpu, redis script seconds)."""
    out = []
    for batch in batches:
        w0, r0, s0 = meter.read()
        process_batch(batch, store)
        w1, r1, s1 = meter.read()
        out.append({"worker": w1 - w0, "redis": r1 - r0, "script": s1 - s0})
    return out


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def growth(sizes: list[int], n_events: int, load_batch: int) -> dict[str, Any]:
    """The growth measurement in this process (the code on sys.path)."""
    import redis

    from config.settings import Settings, get_settings
    from workers.pipeline import process_batch
    from workers.state.store import Store

    get_settings.cache_clear()
    client = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    store = Store(client, Settings())
    meter = Meter(client)
    window_sizes: list[int] = []
    timelines = getattr(store, "timelines", None)
    if timelines is not None:  # this release: count the facts the store returned per event
        original = timelines._window

        def counted(patient: str, result: list[Any]) -> Any:
            window = original(patient, result)
            window_sizes.append(sum(len(r.facts) for r in window.resources.values()))
            return window

        timelines._window = counted
    from fhir_builders import potassium

    results: dict[str, Any] = {}
    # warm-up (catalog load, script loading, caches): a patient of its own, not measured
    _store_only(store, "warm", _history("warm", 50), load_batch)
    for j in range(20):
        at = T0 + timedelta(hours=4 * j)
        process_batch(_events([potassium(3.2 if j % 3 == 0 else 4.1, at=_iso(at), patient="warm")], at), store)
    for n in sizes:
        patient = f"g{n}"
        history = _history(patient, n)
        _store_only(store, patient, history, load_batch)
        batches = []
        for j in range(n_events):
            at = T0 + timedelta(hours=4 * j)
            value = 3.2 if j % 3 == 0 else 4.1
            batches.append(_events([potassium(value, at=_iso(at), patient=patient, id=f"m{j}")], at))
        window_sizes.clear()
        rows = _run_events(process_batch, store, batches, meter)
        results[str(n)] = {
            "facts_stored_before": n,
            "events": n_events,
            "worker_cpu_ms": round(_mean(rows, "worker") * 1e3, 3),
            "redis_cpu_ms": round(_mean(rows, "redis") * 1e3, 3),
            "redis_script_ms": round(_mean(rows, "script") * 1e3, 3),
            "window_facts_mean": round(sum(window_sizes) / len(window_sizes), 1) if window_sizes else None,
            "window_facts_max": max(window_sizes) if window_sizes else None,
        }
        print(f"  {n:>5} facts: {results[str(n)]}", flush=True)
    base = results[str(sizes[0])]
    for n in sizes:
        row = results[str(n)]
        for key in ("worker_cpu_ms", "redis_cpu_ms", "redis_script_ms"):
            row[f"{key}_ratio"] = round(row[key] / base[key], 2) if base[key] else None
    return results


def alert_updates(n_updates: int) -> dict[str, Any]:
    import redis
    from fhir_builders import potassium

    from config.settings import Settings, get_settings
    from workers.pipeline import process_batch
    from workers.state import keys
    from workers.state.store import Store

    get_settings.cache_clear()
    client = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    store = Store(client, Settings())
    meter = Meter(client)
    patient = "alert1"
    week = [potassium(4.2, at=_iso(T0 - timedelta(hours=8 * i)), patient=patient, id=f"n{i}") for i in range(21, 0, -1)]
    process_batch(_events(week, T0), store)
    batches = []
    for j in range(n_updates):
        at = T0 + timedelta(hours=8 * j)
        value = round(3.05 + (j % 30) / 100, 2)
        batches.append(_events([potassium(value, at=_iso(at), patient=patient, id=f"u{j}")], at))
    rows = _run_events(process_batch, store, batches[:1], meter)
    [alert_id] = client.hvals(keys.patient_keys(patient)["open"])
    size_first = client.hstrlen(keys.patient_keys(patient)["alerts"], alert_id)
    rows += _run_events(process_batch, store, batches[1:100], meter)
    size_100 = client.hstrlen(keys.patient_keys(patient)["alerts"], alert_id)
    rows += _run_events(process_batch, store, batches[100:], meter)
    size_last = client.hstrlen(keys.patient_keys(patient)["alerts"], alert_id)
    alert = store.get_alert(patient, alert_id)
    first, last = rows[:100], rows[-100:]
    out = {
        "updates": n_updates,
        "history_entries": len(alert["history"]) if alert else None,
        "alert_status": alert["status"] if alert else None,
        "alert_record_bytes_after_first": size_first,
        "alert_record_bytes_after_100": size_100,
        "alert_record_bytes_after_last": size_last,
        "first100_redis_cpu_ms": round(_mean(first, "redis") * 1e3, 3),
        "last100_redis_cpu_ms": round(_mean(last, "redis") * 1e3, 3),
        "first100_redis_script_ms": round(_mean(first, "script") * 1e3, 3),
        "last100_redis_script_ms": round(_mean(last, "script") * 1e3, 3),
        "first100_worker_cpu_ms": round(_mean(first, "worker") * 1e3, 3),
        "last100_worker_cpu_ms": round(_mean(last, "worker") * 1e3, 3),
    }
    out["redis_cpu_ratio_last_to_first"] = round(out["last100_redis_cpu_ms"] / out["first100_redis_cpu_ms"], 2)
    out["redis_script_ratio_last_to_first"] = round(out["last100_redis_script_ms"] / out["first100_redis_script_ms"], 2)
    print(f"  alert: {out}", flush=True)
    return out


def _child(args: argparse.Namespace) -> None:
    result: dict[str, Any] = {"growth": growth(args.sizes, args.events, args.load_batch)}
    try:
        result["alert"] = alert_updates(args.updates)
    except Exception as exc:  # an older tree may not read alerts the same way: the growth part still counts
        result["alert_error"] = f"{type(exc).__name__}: {exc}"
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--events", type=int, default=100, help="measured events per size")
    parser.add_argument("--updates", type=int, default=1000, help="updates of the open alert")
    parser.add_argument("--load-batch", type=int, default=500)
    parser.add_argument("--before", type=Path, help="another checkout to measure the growth part of, same run")
    parser.add_argument("--before-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="sizes 10 100 1000, 20 events, 200 updates")
    parser.add_argument("--out", type=Path, default=None, help="default: results/growth[-quick].json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.quick:
        args.sizes, args.events, args.updates = [10, 100, 1000], 20, 200
    if args.out is None:
        args.out = HERE.parent / "results" / ("growth-quick.json" if args.quick else "growth.json")
    proc, url = _start_redis()
    os.environ.update(ENV, REDIS_URL=url)
    report: dict[str, Any] = {
        "machine": _machine(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg(),
        "method": {
            "sizes": args.sizes,
            "measured_events_per_size": args.events,
            "alert_updates": args.updates,
            "history": "K / Mg results every 4 h, every 25th an ended furosemide statement; retention 20 years",
            "measured_event": "one new potassium result per batch, 4 h apart",
            "worker_cpu": "time.process_time of process_batch (the worker's whole per-event CPU)",
            "redis_cpu": "INFO cpu used_cpu_user+used_cpu_sys delta (includes INFO calls themselves)",
            "redis_script": "INFO commandstats usec of EVAL/EVALSHA",
        },
    }
    try:
        print("growth (this tree):", flush=True)
        report["growth"] = growth(args.sizes, args.events, args.load_batch)
        if args.before:
            print(f"growth (before: {args.before}):", flush=True)
            before_url = url.rsplit("/", 1)[0] + "/1"
            env = {**os.environ, "BENCH_CODE_ROOT": str(args.before), "REDIS_URL": before_url}
            sizes = [str(s) for s in (args.before_sizes or args.sizes)]
            cmd = [sys.executable, str(HERE), "--child", "--events", str(args.events), "--sizes", *sizes]
            cmd += ["--updates", str(args.updates)]
            cmd += ["--load-batch", str(args.load_batch)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(args.before))
            sys.stdout.write(done.stdout)
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if line:
                before = json.loads(line[-1][len("RESULT ") :])
                report["growth_before"] = before["growth"]
                report["alert_before"] = before.get("alert") or before.get("alert_error")
                head = subprocess.run(["git", "-C", str(args.before), "rev-parse", "HEAD"], capture_output=True)
                report["before_commit"] = head.stdout.decode().strip()
            else:
                report["growth_before_error"] = done.stderr[-3000:]
                print(done.stderr[-3000:], file=sys.stderr)
        print("alert updates:", flush=True)
        report["alert"] = alert_updates(args.updates)
    finally:
        proc.terminate()
        proc.wait()
    report["load_average_end"] = os.getloadavg()
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    g = report["growth"]
    last = str(args.sizes[-1])
    report["targets"] = {
        f"worker_cpu_{last}_within_2x_of_{args.sizes[0]}": g[last]["worker_cpu_ms_ratio"] <= 2.0,
        f"redis_cpu_{last}_ratio": g[last]["redis_cpu_ms_ratio"],
        "alert_last100_within_1.5x_first100": report["alert"]["redis_cpu_ratio_last_to_first"] <= 1.5,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report["targets"]), f"-> {args.out}")


if __name__ == "__main__":
    main()
