"""Benchmark of the review worklist index on many alerts, relative to a raw-Redis baseline.

Seeds N synthetic alerts (default 30,000 over 12,000 patients, three rules, mixed severities and statuses)
the way the store writes them (per-patient hash, ``alert_index``, ``alert_patients``), indexes them once
(``ReviewIndex.sync``, time printed, and the cost of a sync while they are all still inside the overlap
window), waits until the burst is older than the overlap, then times worklist queries against a baseline
read of the same size:

* ``baseline``  - ``ZRANGE`` of 50 ids from the ``all`` set and ``MGET`` of their 50 summaries (what any page
  costs at least);
* ``default``   - open alerts, severity then oldest, first page of 50 (plus the incremental ``sync``);
* ``rule``, ``severity``, ``newest``, ``page2`` - one filter / other order / the page after a cursor;
* ``text``      - a text filter, which walks the set and filters summaries.

Each round times every workload back to back; the report gives per-round ratios ``baseline time / workload
time`` (median and min..max), so only ratios compare across machines. Needs ``redis-server`` on PATH (a
private one is started on a free port; REDIS_URL is never used).

    .venv/bin/python bench/bench_review.py            # writes bench/results/review.json
    .venv/bin/python bench/bench_review.py --quick    # 3,000 alerts, a few rounds
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import free_port  # noqa: E402 - bench/ is on sys.path when run as a script


def _seed(client, n: int) -> None:
    from workers.state import keys

    rng = random.Random(7)
    rules = ["hypokalemia-without-magnesium", "refractory-hypokalemia-on-diuretic", "arrhythmia-with-low-magnesium"]
    statuses = ["active"] * 5 + ["acknowledged", "overridden", "resolved", "resolved", "snoozed"]
    pipe = client.pipeline(transaction=False)
    now = time.time()
    for i in range(n):
        patient, alert_id, status = f"p{i % 12000}", str(uuid.uuid4()), rng.choice(statuses)
        alert = {
            "id": alert_id,
            "rule_id": rng.choice(rules),
            "rule_version": "1.0.0",
            "patient": patient,
            "severity": rng.choice(["critical", "warning", "info", "info"]),
            "status": status,
            "card": {"summary": f"Low K {rng.randint(20, 34) / 10} mmol/L and no Mg measured"},
            "opened_at": f"2024-03-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00.000000Z",
            "revision": 1,
            "history": [{"action": "opened", "by": "system", "at": "2024-03-01T00:00:00.000000Z"}],
            "snoozed_until": "2099-01-01T00:00:00.000000Z" if status == "snoozed" else None,
        }
        pipe.hset(keys.patient_keys(patient)["alerts"], alert_id, json.dumps(alert))
        pipe.zadd(keys.alert_index(), {f"{patient}|{alert_id}": now})
        pipe.hset(keys.alert_patients(), alert_id, patient)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3,000 alerts, 5 rounds")
    args = parser.parse_args()
    n, rounds = (3000, 5) if args.quick else (30000, 15)
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server not found")
    port = free_port()
    command = [server, "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    os.environ["EHR_ALERTS_KEY_PREFIX"] = "bench"
    try:
        import redis

        from config.settings import get_settings
        from workers.state.review_index import Query, ReviewIndex, order_key, summary_key
        from workers.state.store import Store

        client = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
        for _ in range(50):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        _seed(client, n)
        index = ReviewIndex(Store(client, get_settings()))
        started = time.perf_counter()
        index.sync()
        first_sync = time.perf_counter() - started
        started = time.perf_counter()
        index.sync()  # right after a burst: every alert is inside the overlap window
        burst_sync = time.perf_counter() - started
        time.sleep(index.overlap + 1)  # steady state: the burst is older than the overlap
        cursor = index.list(Query()).next_cursor

        def baseline() -> None:
            ids = client.zrange(order_key("all", "time"), 0, 49)
            client.mget([summary_key(i) for i in ids])

        def page(query: Query, after: str | None = None) -> Callable[[], None]:
            def run() -> None:
                index.sync()
                index.list(query, after)

            return run

        workloads: dict[str, Callable[[], None]] = {
            "baseline": baseline,
            "default": page(Query()),
            "rule": page(Query(rule="refractory-hypokalemia-on-diuretic")),
            "severity": page(Query(severity="warning")),
            "newest": page(Query(status="all", sort="newest")),
            "page2": page(Query(), cursor),
            "text": page(Query(status="all", text="3.1 mmol")),
        }
        times: dict[str, list[float]] = {name: [] for name in workloads}
        for _ in range(rounds):
            for name, run in workloads.items():
                started = time.perf_counter()
                for _ in range(10):
                    run()
                times[name].append((time.perf_counter() - started) / 10)
        report = {
            "alerts": n,
            "first_sync_seconds": round(first_sync, 2),
            "sync_within_overlap_seconds": round(burst_sync, 3),
            "rounds": rounds,
            "ms_median": {k: round(1000 * statistics.median(v), 2) for k, v in times.items()},
            "ratio_to_baseline": {},
        }
        for name, values in times.items():
            if name == "baseline":
                continue
            ratios = [times["baseline"][i] / values[i] for i in range(rounds)]
            report["ratio_to_baseline"][name] = {
                "median": round(statistics.median(ratios), 3),
                "min": round(min(ratios), 3),
                "max": round(max(ratios), 3),
            }
        out = ROOT / "bench" / "results" / ("review-quick.json" if args.quick else "review.json")
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(report, indent=2))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
