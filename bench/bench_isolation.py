"""CDS Hooks latency while a client streams ``$import``, against CDS latency idle, in the same run (issue 15).

Real processes on loopback: a private ``redis-server`` (free port, never 6379), uvicorn serving ``service.app:app``
and, with ``--worker``, a real Celery worker (``ehr-alerts worker -c 1``) consuming what ingestion queues.
Two shapes, one after the other:

* ``single`` - one API process serves both CDS Hooks and ingestion (``EHR_ALERTS_API_ROUTES=all``, the
  default; the shape issue 15 measured);
* ``split``  - two API processes of the same code, ``EHR_ALERTS_API_ROUTES=cds`` and ``=ingest``
  (the Helm chart's ``api.split`` shape).

Per shape, phases alternate ``idle`` (only the CDS client) and ``import`` (the CDS client while an ingestion
client posts 500-line ``application/fhir+ndjson`` requests in a loop, each answered 202 before the next). The
CDS client calls ``mg-k-patient-view`` one call at a time with the 100-resource prefetch of ``bench_cds.py``
(warm: the same chart, as an EHR re-opening it), a fresh client JWT per call; the ratio is CDS p99 under import
to CDS p99 idle (target <= 2). Also reported: p50, the import throughput and the load average at start and end.

    .venv/bin/python bench/bench_isolation.py            # ~3 min, writes bench/results/isolation.json
    .venv/bin/python bench/bench_isolation.py --quick    # smoke, bench/results/isolation-quick.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cds import (
    ISSUER,
    PATIENT,
    RESULTS_DIR,
    ROOT,
    SERVICE,
    Signer,
    _Connection,
    _wait,
    cpu_seconds,
    machine,
    percentile,
    prefetch_keys,
    request_template,
)
from harness import free_port, loadavg, start_redis, stop_group

TARGET_RATIO = 2.0
LINES = 500
FEED_SCOPE = "system/Observation.cu"


def _feed_token(signer: Signer) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "ehr-alerts", "iat": now, "exp": now + 3600, "sub": "bench-lab",
              "client_id": "bench-lab", "scope": FEED_SCOPE}  # fmt: skip
    return signer.jwt.encode(claims, signer.key, algorithm="ES384", headers={"kid": "bench-1", "typ": "JWT"})


def _ndjson(batch: int) -> bytes:
    """500 potassium results for 50 patients (a backfill), ids unique per request."""
    base = datetime.now(UTC) - timedelta(days=30)
    lines = []
    for i in range(LINES):
        when = (base + timedelta(minutes=batch * LINES + i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(
            json.dumps(
                {
                    "resourceType": "Observation",
                    "id": f"imp-{batch}-{i}",
                    "meta": {"versionId": "1", "lastUpdated": when},
                    "status": "final",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "laboratory",
                                }
                            ]
                        }
                    ],
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
                    "subject": {"reference": f"Patient/imp-{i % 50}"},
                    "effectiveDateTime": when,
                    "valueQuantity": {
                        "value": 3.6 + (i % 10) / 10,
                        "unit": "mmol/L",
                        "system": "http://unitsofmeasure.org",
                        "code": "mmol/L",
                    },
                }
            )
        )
    return "\n".join(lines).encode()


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def stack(workdir: Path, signer: Signer, shape: str, worker: bool) -> Any:
    """Redis, the API process(es) of ``shape`` and optionally a worker; yields (cds base, ingest base, pids)."""
    redis_proc, redis_url = start_redis(new_session=True)
    procs = [redis_proc]
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "EHR_ALERTS_KEY_PREFIX": "bench",
        "EHR_ALERTS_CDS_ISSUERS": json.dumps({ISSUER: str(signer.jwks_path)}),
        "EHR_ALERTS_FEED_ISSUERS": json.dumps({ISSUER: str(signer.jwks_path)}),
        "EHR_ALERTS_LOG_LEVEL": "WARNING",
    }
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    routes = {"single": ["all"], "split": ["cds", "ingest"]}[shape]
    bases, pids = [], []
    try:
        for route in routes:
            port = free_port()
            argv = [uvicorn, "service.app:app", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--log-level", "warning", "--no-access-log"]  # fmt: skip
            procs.append(_spawn(argv, {**env, "EHR_ALERTS_API_ROUTES": route}, workdir / f"api-{route}.log"))
            base = f"http://127.0.0.1:{port}"
            _wait(lambda base=base: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, f"API {route}")
            bases.append(base)
            pids.append(procs[-1].pid)
        if worker:
            ehr = str(Path(sys.executable).with_name("ehr-alerts"))
            procs.append(_spawn([ehr, "worker", "-c", "1"], env, workdir / "worker.log"))
        yield bases[0], bases[-1], pids
    finally:
        for proc in reversed(procs):
            stop_group(proc, 15)


async def _cds_client(base: str, template: str, signer: Signer, stop: asyncio.Event, out: list[float]) -> None:
    host, port = base.removeprefix("http://").split(":")
    connection = _Connection(host, int(port))
    aud = f"{base}/cds-services/{SERVICE}"
    try:
        while not stop.is_set():
            tokens = signer.tokens(aud, 20)  # signed in small batches, outside the timed request
            for token in tokens:
                if stop.is_set():
                    break
                body = template.replace("HOOK-INSTANCE", str(uuid.uuid4())).encode()
                started = time.perf_counter()
                status, payload = await connection.request("POST", f"/cds-services/{SERVICE}", body, token)
                out.append(time.perf_counter() - started)
                if status != 200:
                    raise SystemExit(f"CDS call: HTTP {status} {payload[:200]!r}")
    finally:
        connection.close()


async def _import_client(base: str, token: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    host, port = base.removeprefix("http://").split(":")
    connection = _Connection(host, int(port))
    try:
        while not stop.is_set():
            body = _ndjson(counts["requests"] + counts.get("offset", 0))
            status, payload = await connection.request(
                "POST", "/fhir/$import", body, token, content_type="application/fhir+ndjson"
            )
            if status != 202:
                raise SystemExit(f"$import: HTTP {status} {payload[:200]!r}")
            counts["requests"] += 1
    finally:
        connection.close()


async def _phase(
    cds: str, ingest: str, template: str, signer: Signer, seconds: float, importing: bool, counts: dict[str, int]
) -> list[float]:
    stop = asyncio.Event()
    latencies: list[float] = []
    tasks = [asyncio.create_task(_cds_client(cds, template, signer, stop, latencies))]
    if importing:
        tasks.append(asyncio.create_task(_import_client(ingest, _feed_token(signer), stop, counts)))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return latencies


def _stats(latencies: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies]
    return {
        "calls": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
    }


def run_shape(shape: str, rounds: int, seconds: float, worker: bool) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        stack(Path(tmp), signer := Signer(Path(tmp)), shape, worker) as (
            cds,
            ingest,
            pids,
        ),
    ):
        template = request_template(datetime.now(UTC), prefetch_keys(cds, signer))
        counts = {"requests": 0, "offset": 0}
        asyncio.run(_phase(cds, ingest, template, signer, 2.0, True, counts))  # warm-up of both paths
        counts["offset"], counts["requests"] = counts["requests"] + 1000, 0
        idle: list[float] = []
        loaded: list[float] = []
        per_round = []
        cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        import_seconds = 0.0
        for _ in range(rounds):
            a = asyncio.run(_phase(cds, ingest, template, signer, seconds, False, counts))
            before = counts["requests"]
            b = asyncio.run(_phase(cds, ingest, template, signer, seconds, True, counts))
            import_seconds += seconds
            idle += a
            loaded += b
            per_round.append(
                {
                    "idle_p99_ms": _stats(a)["p99_ms"],
                    "import_p99_ms": _stats(b)["p99_ms"],
                    "imports": counts["requests"] - before,
                }
            )
        cpu = {str(pid): round(cpu_seconds(pid) - cpu_before[pid], 2) for pid in pids}
    idle_stats, loaded_stats = _stats(idle), _stats(loaded)
    return {
        "shape": shape,
        "api_processes": len(pids),
        "idle": idle_stats,
        "import": loaded_stats,
        "p99_ratio": round(loaded_stats["p99_ms"] / idle_stats["p99_ms"], 2),
        "p50_ratio": round(loaded_stats["p50_ms"] / idle_stats["p50_ms"], 2),
        "import_requests": counts["requests"],
        "import_lines_per_s": round(counts["requests"] * LINES / import_seconds, 1),
        "api_cpu_seconds": cpu,
        "per_round": per_round,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (smoke)")
    parser.add_argument("--worker", action="store_true", help="also run a real Celery worker (-c 1)")
    parser.add_argument("--shapes", default="single,split")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    rounds, seconds = (1, 4.0) if args.quick else (3, 12.0)
    start_load = loadavg()
    shapes = [run_shape(shape, rounds, seconds, args.worker) for shape in args.shapes.split(",")]
    report = {
        "benchmark": "bench_isolation",
        "timestamp": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "load_average_at_start": start_load,
        "load_average_at_end": loadavg(),
        "workload": {
            "rounds": rounds,
            "seconds_per_phase": seconds,
            "cds": "mg-k-patient-view, 100-resource prefetch (bench_cds.py), warm chart, one call at a time",
            "import": f"{LINES}-line application/fhir+ndjson $import requests in a loop, one at a time",
            "celery_worker": args.worker,
            "patient": PATIENT,
        },
        "shapes": shapes,
        "target_p99_ratio": TARGET_RATIO,
        "meets_target": {s["shape"]: s["p99_ratio"] <= TARGET_RATIO for s in shapes},
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    output = args.output or RESULTS_DIR / ("isolation-quick.json" if args.quick else "isolation.json")
    output.write_text(json.dumps(report, indent=2) + "\n")
    for s in shapes:
        print(
            f"{s['shape']:<7} idle p50/p99 {s['idle']['p50_ms']}/{s['idle']['p99_ms']} ms; under $import "
            f"{s['import']['p50_ms']}/{s['import']['p99_ms']} ms; p99 ratio {s['p99_ratio']} "
            f"(target <= {TARGET_RATIO}); {s['import_lines_per_s']} lines/s imported"
        )
    print(f"load average {report['load_average_at_start']} -> {report['load_average_at_end']}; written to {output}")


if __name__ == "__main__":
    main()
