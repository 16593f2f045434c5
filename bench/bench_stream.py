"""End-to-end stream benchmark: ndjson over HTTP ``POST /fhir/$import`` -> Celery workers -> alerts stored.

Everything runs for real on this machine: a private ``redis-server`` on a free port, the API (uvicorn,
one process) and Celery workers (prefork, 1 and 2 processes) as subprocesses, the client in this
process. The feed is ``bench/stream_data.py``: a few thousand synthetic patients (labs, medications,
conditions; codes from the packaged value sets; seeded).

Per worker count, in rounds (the machine is shared and noisy, so each round measures both back to back):

* ``noop`` (baseline): one no-op Celery task per event (``workers.tasks.noop``, the raw resource as its
  argument), published from this process as fast as it can while the workers consume; time from the
  first publish until the queue and the unacked hash are empty.
* ``stream``: the feed as ndjson requests (``--chunk`` lines each, 2 client threads), validated and
  normalised by the API, batched through the inbox to the workers, which store timelines and alerts;
  time from the first request until every batch is finished. Validation is included.

The figure that matters is ``stream events/s / noop tasks/s`` of the same round (target >= 3).

Then, on the last state of the 2-process run: Redis memory per patient (``MEMORY USAGE`` of every
patient key, by key kind), and the p99 event-to-alert latency at half the saturated rate: the feed is
paced in small requests, each carrying one probe patient's low potassium that opens an alert at once;
latency = time the worker indexed the alert - time the request was sent.

Run from the repository root::

    .venv/bin/python bench/bench_stream.py            # ~5 min, writes bench/results/stream.json
    .venv/bin/python bench/bench_stream.py --quick    # ~1 min smoke, writes bench/results/stream-quick.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUEUE = "ehr-alerts"
PREFIX = "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    """The private Redis, the API and the workers of one benchmark run."""

    def __init__(self, logs: Path, batch_size: int) -> None:
        self.logs = logs
        port = _free_port()
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server not found: the stream benchmark needs a real Redis")
        self.redis_proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{port}/0"
        self.env = {
            **os.environ,
            "REDIS_URL": self.url,
            "EHR_ALERTS_KEY_PREFIX": PREFIX,
            "EHR_ALERTS_BATCH_SIZE": str(batch_size),
            "PYTHONUNBUFFERED": "1",
        }
        os.environ.update({k: self.env[k] for k in ("REDIS_URL", "EHR_ALERTS_KEY_PREFIX")})
        import redis

        self.client = redis.Redis.from_url(self.url, decode_responses=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen(
            args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_api(self) -> None:
        import httpx

        port = _free_port()
        self.api = self._spawn(
            [str(BIN / "uvicorn"), "service.app:app", "--port", str(port), "--log-level", "warning", "--no-access-log"],
            "api",
        )
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return
            if self.api.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the API did not start; see {self.logs}/api.log")
            time.sleep(0.2)

    def start_workers(self, processes: int) -> None:
        self.workers = self._spawn(
            [
                str(BIN / "celery"),
                "-A",
                "workers.celery_app",
                "worker",
                "-Q",
                QUEUE,
                "-c",
                str(processes),
                "--pool",
                "prefork",
                "--loglevel",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            f"workers-{processes}",
        )
        deadline = time.monotonic() + 60
        while not any(c.get("cmd") == "brpop" for c in self.client.client_list()):
            if self.workers.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the workers did not start; see {self.logs}")
            time.sleep(0.1)

    def stop_workers(self) -> None:
        if self.workers is not None:
            _stop(self.workers)
            self.workers = None

    def close(self) -> None:
        self.stop_workers()
        if self.api is not None:
            _stop(self.api)
        self.redis_proc.terminate()
        self.redis_proc.wait(10)

    # --- waiting ----------------------------------------------------------------------------------------

    def wait_idle(self, *, inbox_too: bool, timeout: float = 900) -> float:
        """Poll until the queue and unacked hash (and the inbox) are empty; returns the time it was seen."""
        from workers import inbox

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(QUEUE)
            pipe.hlen("unacked")
            queued, unacked = pipe.execute()
            if queued == 0 and unacked == 0 and (not inbox_too or inbox.size(self.client) == 0):
                return time.perf_counter()
            if self.workers is not None and self.workers.poll() is not None:
                raise SystemExit(f"workers exited; see {self.logs}")
            time.sleep(0.005)
        raise SystemExit("the workers did not drain the queue in time")

    def forget_patients(self, pattern: str) -> None:
        """Delete the keys of the patients matching ``pattern`` (a fresh start for the next phase)."""
        batch = []
        for key in self.client.scan_iter(match=f"{PREFIX}:{{p:{pattern}}}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group (Linux /proc)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def cpu_snapshot(bench: Bench) -> dict[str, float]:
    """CPU seconds so far of each component: API, workers, Redis, this client."""
    return {
        "api": _group_cpu(bench.api.pid) if bench.api else 0.0,
        "workers": _group_cpu(bench.workers.pid) if bench.workers else 0.0,
        "redis": _proc_cpu(bench.redis_proc.pid),
        "client": time.process_time(),
    }


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_per_item(before: dict[str, float], after: dict[str, float], items: int) -> dict[str, float]:
    """Microseconds of CPU per item, by component, between two snapshots."""
    out = {k: round(1e6 * (after[k] - before[k]) / items, 1) for k in before}
    out["total"] = round(sum(out.values()), 1)
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# --- phases --------------------------------------------------------------------------------------------


def ndjson_bodies(resources: list[dict[str, Any]], chunk: int) -> list[bytes]:
    """The feed as ndjson request bodies of ``chunk`` lines each."""
    return [
        "\n".join(json.dumps(r, separators=(",", ":")) for r in resources[i : i + chunk]).encode()
        for i in range(0, len(resources), chunk)
    ]


def post_all(bench: Bench, bodies: list[bytes], threads: int = 2) -> Counter[str]:
    """POST every body (``threads`` clients in parallel); returns the summed entry outcomes."""
    import httpx

    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    queue = list(reversed(bodies))
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                response = http.post(
                    f"{bench.base_url}/fhir/$import",
                    content=body,
                    headers={"Content-Type": "application/fhir+ndjson"},
                )
                if response.status_code != 202:
                    errors.append(f"{response.status_code}: {response.text[:300]}")
                    return
                summary = response.json()["issue"][0]["diagnostics"]
                with lock:
                    outcomes.update(_parse_summary(summary))

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise SystemExit(f"ingestion failed: {errors[0]}")
    return outcomes


def _parse_summary(text: str) -> Counter[str]:
    """'12 accepted, 1 ignored (...), 0 rejected; 12 events queued' -> counts."""
    counts: Counter[str] = Counter()
    for part in text.replace(";", ",").split(","):
        words = part.split()
        if len(words) >= 2 and words[0].isdigit():
            counts[words[1]] += int(words[0])
    return counts


def run_noop(bench: Bench, resources: list[dict[str, Any]]) -> dict[str, float]:
    """The baseline: one no-op task per event, published while the workers consume."""
    from workers.tasks import noop

    cpu = cpu_snapshot(bench)
    start = time.perf_counter()
    for resource in resources:
        noop.delay(resource)
    published = time.perf_counter()
    end = bench.wait_idle(inbox_too=False)
    return {
        "tasks": len(resources),
        "seconds": end - start,
        "per_s": len(resources) / (end - start),
        "publish_seconds": published - start,
        "cpu_us_per_task": cpu_per_item(cpu, cpu_snapshot(bench), len(resources)),
    }


def run_stream(bench: Bench, bodies: list[bytes], events: int) -> dict[str, Any]:
    """The feed over HTTP until every batch is finished; checks nothing was lost or dead-lettered."""
    from workers.pipeline import get_store

    store = get_store()
    before = Counter(store.counters())
    cpu = cpu_snapshot(bench)
    start = time.perf_counter()
    outcomes = post_all(bench, bodies)
    posted = time.perf_counter()
    end = bench.wait_idle(inbox_too=True)
    cpu_after = cpu_snapshot(bench)
    delta = Counter(store.counters()) - before
    processed = delta["events_stored"] + delta["events_duplicate"] + delta["events_stale"]
    if processed != outcomes["events"] or store.dead_letters():
        raise SystemExit(f"events lost or dead-lettered: queued {outcomes['events']}, processed {processed}")
    return {
        "resources": sum(outcomes[k] for k in ("accepted", "ignored", "rejected")),
        "events": outcomes["events"],
        "rejected": outcomes["rejected"],
        "seconds": end - start,
        "post_seconds": posted - start,
        "events_per_s": outcomes["events"] / (end - start),
        "cpu_us_per_event": cpu_per_item(cpu, cpu_after, outcomes["events"]),
        "alerts_opened": delta["alerts_opened"],
        "alerts_resolved": delta["alerts_resolved"],
        "alerts_updated": delta["alerts_updated"],
    }


def memory_per_patient(bench: Bench) -> dict[str, Any]:
    """MEMORY USAGE of every benchmark patient key, summed by key kind, per patient."""
    by_kind: Counter[str] = Counter()
    patients: set[str] = set()
    keys = list(bench.client.scan_iter(match=f"{PREFIX}:{{p:bp-*}}:*", count=1000))
    pipe = bench.client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    for key, size in zip(keys, pipe.execute(), strict=True):
        patient, kind = key.rsplit(":", 1)
        patients.add(patient)
        by_kind[kind] += size or 0
    n = max(len(patients), 1)
    timeline = by_kind["facts"] + by_kind["meta"]
    return {
        "patients": len(patients),
        "bytes_per_patient": {kind: round(v / n) for kind, v in sorted(by_kind.items())},
        "timeline_bytes_per_patient": round(timeline / n),
        "all_keys_bytes_per_patient": round(sum(by_kind.values()) / n),
        "used_memory_bytes": int(bench.client.info("memory")["used_memory"]),
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
                headers={"Content-Type": "application/fhir+ndjson"},
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
    }


# --- main ------------------------------------------------------------------------------------------------


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
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    patients = args.patients or (400 if args.quick else 2500)
    rounds = args.rounds or (1 if args.quick else 2)
    paced_seconds = args.paced_seconds or (5 if args.quick else 20)
    output = args.output or RESULTS_DIR / ("stream-quick.json" if args.quick else "stream.json")

    from stream_data import generate

    feed = generate(patients)
    bodies = ndjson_bodies(feed, args.chunk)
    logs = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    bench = Bench(logs, args.batch_size)
    results: dict[str, Any] = {"runs": {}}
    try:
        bench.start_api()
        warmup = ndjson_bodies(generate(20, seed=1, prefix="warmup"), 100)
        for processes in [int(n) for n in args.workers.split(",")]:
            bench.start_workers(processes)
            post_all(bench, warmup)  # imports, rule catalog self-test, connections
            bench.wait_idle(inbox_too=True)
            rounds_out = []
            for r in range(rounds):
                noop = run_noop(bench, feed)
                bench.forget_patients("bp-*")
                stream = run_stream(bench, bodies, len(feed))
                ratio = stream["events_per_s"] / noop["per_s"]
                rounds_out.append({"noop": noop, "stream": stream, "ratio": ratio})
                print(
                    f"{processes} worker process(es), round {r + 1}: noop {noop['per_s']:,.0f} tasks/s, "
                    f"stream {stream['events_per_s']:,.0f} events/s, ratio {ratio:.2f}; CPU us per task / event: "
                    f"noop {noop['cpu_us_per_task']}, stream {stream['cpu_us_per_event']}",
                    flush=True,
                )
            results["runs"][str(processes)] = {
                "rounds": rounds_out,
                "ratio_median": statistics.median(r["ratio"] for r in rounds_out),
                "stream_events_per_s_median": statistics.median(r["stream"]["events_per_s"] for r in rounds_out),
                "noop_tasks_per_s_median": statistics.median(r["noop"]["per_s"] for r in rounds_out),
            }
            if processes == max(int(n) for n in args.workers.split(",")):
                results["memory"] = memory_per_patient(bench)
                saturated = results["runs"][str(processes)]["stream_events_per_s_median"]
                bench.forget_patients("bp-*")
                results["latency"] = {
                    "worker_processes": processes,
                    **run_paced(bench, feed, saturated / 2, paced_seconds),
                }
            bench.stop_workers()
    finally:
        bench.close()
    from importlib import metadata

    results["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "celery": metadata.version("celery"),
        "kombu": metadata.version("kombu"),
        "redis_server": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
    }
    results["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["workload"] = {
        "patients": patients,
        "resources": len(feed),
        "by_type": dict(Counter(r["resourceType"] for r in feed)),
        "chunk_lines": args.chunk,
        "batch_size": args.batch_size,
        "client_threads": 2,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    for n, run in results["runs"].items():
        print(
            f"{n} worker process(es): stream {run['stream_events_per_s_median']:,.0f} events/s, noop "
            f"{run['noop_tasks_per_s_median']:,.0f} tasks/s, ratio {run['ratio_median']:.2f} (median of rounds)"
        )
    print(f"written to {output}; logs in {logs}")


if __name__ == "__main__":
    main()
