"""Benchmark of the CDS Hooks patient-view service under concurrent load, beside a trivial endpoint.

One uvicorn worker serves ``service.app:app`` on loopback with a private ``redis-server`` (a free port, never
6379). A load generator in this process runs 10 concurrent clients (one keep-alive HTTP/1.1 connection each, a
minimal asyncio client so the generator takes little CPU from the server):

* ``healthz``      - ``GET /healthz``, the trivial endpoint of the same app (the baseline);
* ``patient-view`` - ``POST /cds-services/mg-k-patient-view`` with a full prefetch of 100 FHIR resources
  (45 potassium, 15 magnesium, 10 QTc, 10 Condition, 10 MedicationRequest, 10 MedicationStatement) for a
  patient on furosemide with persistent low potassium and no recent magnesium, so two rules fire and two
  cards are rendered (and merged with the store, and persisted for feedback) on every call. Each call has
  its own ``hookInstance`` and its own CDS client JWT (ES384, fresh ``jti``, aud = the service URL), verified
  by the service exactly as in production (signature, issuer allow-list, aud, exp/iat, jti replay in Redis).

* ``patient-view-cold`` - the same call for a patient never seen before (a fresh patient id per call), so
  every resource misses the normalisation cache and is validated with ``fhir.resources``: the cost of the
  first chart open (informational; the targets apply to ``patient-view``).

Rounds alternate the workloads; the report gives p50 / p95 / p99 latency (ms) and requests/s per
workload over all rounds, and the per-round ratio of the patient-view p95 to the healthz p95. Targets:
patient-view p95 <= 50 ms and p99 <= 100 ms.

Run from the repository root::

    .venv/bin/python bench/bench_cds.py            # ~1 min, writes bench/results/cds.json
    .venv/bin/python bench/bench_cds.py --quick    # a few seconds (smoke), writes bench/results/cds-quick.json
    .venv/bin/python bench/bench_cds.py --cold-chart   # issue 15: cold-chart CPU per call against a bare
                                                       # FastAPI POST of the same body, bench/results/cds-cold.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import free_port, loadavg, start_redis, stop_group

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PATIENT = "bench-cds-1"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
SERVICE = "mg-k-patient-view"
TARGET_P95_MS, TARGET_P99_MS = 50.0, 100.0
WORKLOADS = ("healthz", "patient-view", "patient-view-cold")


# --- the patient -------------------------------------------------------------------------------------


def _at(now: datetime, hours: float) -> str:
    return (now - timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _observation(rid: str, code: str, value: float, unit: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
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
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "effectiveDateTime": when,
        "issued": when,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def _medication(kind: str, rid: str, code: str, display: str) -> dict[str, Any]:
    medication = {"coding": [{"system": RXNORM, "code": code, "display": display}], "text": display}
    if kind == "MedicationStatement":
        return {
            "resourceType": kind,
            "id": rid,
            "status": "active",
            "medicationCodeableConcept": medication,
            "subject": {"reference": f"Patient/{PATIENT}"},
            "effectivePeriod": {"start": "2024-01-01"},
        }
    return {
        "resourceType": kind,
        "id": rid,
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": medication,
        "subject": {"reference": f"Patient/{PATIENT}"},
        "authoredOn": "2024-01-01",
        "dosageInstruction": [{"text": "once daily"}],
    }


def patient_prefetch(now: datetime) -> dict[str, Any]:
    """The 100-resource prefetch, keyed like the service's discovery document."""
    potassium = [
        _observation(f"k{i}", "2823-3", round(3.1 + (i % 7) / 10, 1) if i else 3.1, "mmol/L", _at(now, 4 + 16 * i))
        for i in range(45)
    ]
    magnesium = [_observation(f"mg{i}", "2601-3", 0.82, "mmol/L", _at(now, 200 + 24 * i)) for i in range(15)]
    qtc = [_observation(f"qtc{i}", "8636-3", 440 + i, "ms", _at(now, 10 + 24 * i)) for i in range(10)]
    conditions = [
        {
            "resourceType": "Condition",
            "id": f"c{i}",
            "clinicalStatus": {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
            },
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{PATIENT}"},
            "onsetDateTime": "2020-01-01",
        }
        for i, (code, display) in enumerate(
            [("38341003", "Hypertension"), ("44054006", "Type 2 diabetes"), ("42343007", "Heart failure")] * 3
            + [("195967001", "Asthma")]
        )
    ]
    drugs = [("4603", "furosemide")] + [("197361", "amlodipine 5 MG Oral Tablet"), ("860975", "metformin")] * 5
    statements = [_medication("MedicationStatement", f"ms{i}", c, d) for i, (c, d) in enumerate(drugs[:10])]
    requests = [_medication("MedicationRequest", f"mr{i}", c, d) for i, (c, d) in enumerate(drugs[1:11])]

    def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "entry": [{"fullUrl": f"https://ehr.example/fhir/{r['resourceType']}/{r['id']}", "resource": r}
                      for r in resources],
        }  # fmt: skip

    return {
        "potassium": searchset(potassium),
        "magnesium": searchset([]),  # none in the last 144 h: the 15 are older
        "qtc": searchset(qtc),
        "ecg": searchset([]),
        "conditions": searchset(conditions),
        "medicationStatements": searchset(statements),
        "medicationRequests": searchset(requests),
        "serviceRequests": searchset([]),
    } | {"_older_magnesium": searchset(magnesium)}  # an unknown key: ignored, still parsed and sent


def request_template(now: datetime, keys: dict[str, str] | None = None) -> str:
    """The call body with a placeholder hookInstance (replaced per call). ``keys``: the service's prefetch
    templates (discovery); keys the bench patient has nothing for are sent empty (a Patient read: a Patient)."""
    prefetch = patient_prefetch(now)
    for key, template in (keys or {}).items():
        if key in prefetch:
            continue
        if template.startswith("Patient/"):
            prefetch[key] = {"resourceType": "Patient", "id": PATIENT, "birthDate": "1950-01-01", "gender": "female"}
        else:
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []}
    body = {
        "hook": "patient-view",
        "hookInstance": "HOOK-INSTANCE",
        "context": {"userId": "Practitioner/bench", "patientId": PATIENT},
        "prefetch": prefetch,
    }
    return json.dumps(body)


def count_resources(template: str) -> int:
    """Resources in the call's prefetch (the unknown ``_older_magnesium`` key not counted)."""
    prefetch = json.loads(template)["prefetch"]
    return sum(len(v.get("entry", [v])) for k, v in prefetch.items() if not k.startswith("_"))


def prefetch_keys(base: str, signer: Signer) -> dict[str, str]:
    """The prefetch templates of the patient-view service, from the running service's discovery."""
    token = signer.tokens(f"{base}/cds-services", 1)[0]
    answer = httpx.get(f"{base}/cds-services", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    answer.raise_for_status()
    return next(s["prefetch"] for s in answer.json()["services"] if s["id"] == SERVICE)


# --- processes ---------------------------------------------------------------------------------------


def _wait(check: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


ISSUER = "https://bench-ehr.example.org"


class Signer:
    """An EHR's CDS client key (ES384) and its JWKS file, trusted by the benchmarked service."""

    def __init__(self, workdir: Path) -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec
        from jwt.algorithms import ECAlgorithm

        self.jwt = jwt
        self.key = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        self.jwks_path = workdir / "bench-jwks.json"
        self.jwks_path.write_text(json.dumps({"keys": [{**jwk, "kid": "bench-1", "use": "sig", "alg": "ES384"}]}))

    def tokens(self, aud: str, count: int) -> list[str]:
        """``count`` distinct tokens (fresh jti each), signed before the timed phase."""
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 900}
        header = {"kid": "bench-1", "typ": "JWT"}
        return [
            self.jwt.encode({**claims, "jti": str(uuid.uuid4())}, self.key, algorithm="ES384", headers=header)
            for _ in range(count)
        ]


@contextlib.contextmanager
def running_stack(
    workdir: Path,
    signer: Signer,
    extra_env: dict[str, str] | None = None,
    app: str = "service.app:app",
    root: Path = ROOT,
) -> Any:
    """A private redis-server and one uvicorn worker serving the code of the checkout ``root``; yields the API base
    URL and the server's pid."""
    api_port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_proc, redis_url = start_redis(new_session=True)
        procs.append(redis_proc)
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "EHR_ALERTS_KEY_PREFIX": "bench",
            "EHR_ALERTS_CDS_AUTH_ENABLED": "true",
            "EHR_ALERTS_CDS_ISSUERS": json.dumps({ISSUER: str(signer.jwks_path)}),
            **(extra_env or {}),
        }
        log = open(workdir / f"api-{api_port}.log", "wb")  # noqa: SIM115 - closed with the process
        uvicorn = Path(sys.executable).with_name("uvicorn")
        procs.append(
            subprocess.Popen(
                [str(uvicorn), app, "--host", "127.0.0.1", "--port", str(api_port),
                 "--workers", "1", "--log-level", "warning", "--no-access-log"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )  # fmt: skip
        base = f"http://127.0.0.1:{api_port}"
        _wait(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, "the API")
        yield base, procs[-1].pid
    finally:
        for proc in reversed(procs):
            stop_group(proc, 10)


# --- load --------------------------------------------------------------------------------------------


class _Connection:
    """A minimal keep-alive HTTP/1.1 client (much less CPU per request than a full client library, so the
    load generator takes less of the machine away from the server it measures)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", token: str = "", content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += f"Content-Type: {content_type}\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _client(
    base: str, workload: str, template: str, tokens: list[str], out: list[float], errors: list[str]
) -> None:
    host, port = base.removeprefix("http://").split(":")
    connection = _Connection(host, int(port))
    try:
        for token in tokens:
            if workload == "healthz":
                started = time.perf_counter()
                status, payload = await connection.request("GET", "/healthz")
            else:
                body_text = template.replace("HOOK-INSTANCE", str(uuid.uuid4()))
                if workload == "patient-view-cold":  # a chart never seen: every resource misses the cache
                    body_text = body_text.replace(PATIENT, f"cold-{uuid.uuid4().hex[:16]}")
                body = body_text.encode()
                started = time.perf_counter()
                status, payload = await connection.request("POST", f"/cds-services/{SERVICE}", body, token)
            elapsed = time.perf_counter() - started
            if status != 200:
                errors.append(f"{workload}: HTTP {status} {payload[:200]!r}")
            out.append(elapsed)
    finally:
        connection.close()


async def run_load(
    base: str, workload: str, template: str, clients: int, per_client: int, signer: Signer
) -> dict[str, Any]:
    """``clients`` concurrent clients, ``per_client`` requests each; latencies in seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    tokens = signer.tokens(f"{base}/cds-services/{SERVICE}", clients * per_client)
    batches = [tokens[i * per_client : (i + 1) * per_client] for i in range(clients)]
    started = time.perf_counter()
    await asyncio.gather(*(_client(base, workload, template, batch, latencies, errors) for batch in batches))
    wall = time.perf_counter() - started
    if errors:
        raise SystemExit(f"errors under load: {errors[:3]}")
    return {"latencies": latencies, "wall": wall}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def summary(latencies: list[float], wall: float) -> dict[str, float]:
    """p50 / p95 / p99 / mean in ms and requests per second."""
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "req_per_s": round(len(ms) / wall, 1),
    }


# --- cold chart: CPU per call against a bare FastAPI POST of the same body (issue 15) ----------------------

COLD_TARGET_RATIO = 10.0
COLD_SHAPES = ("bare", "lean", "full")  # bare FastAPI POST; the service reading lean (default); reading in full


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "fastapi": metadata.version("fastapi"),
        "uvicorn": metadata.version("uvicorn"),
        "pydantic": metadata.version("pydantic"),
        "fhir.resources": metadata.version("fhir.resources"),
    }


async def _sequential(base: str, bodies: list[bytes], tokens: list[str]) -> list[float]:
    host, port = base.removeprefix("http://").split(":")
    connection = _Connection(host, int(port))
    latencies = []
    try:
        for body, token in zip(bodies, tokens, strict=True):
            started = time.perf_counter()
            status, payload = await connection.request("POST", f"/cds-services/{SERVICE}", body, token)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise SystemExit(f"HTTP {status}: {payload[:200]!r}")
    finally:
        connection.close()
    return latencies


def _cold_calls(server: tuple[str, int], template: str, signer: Signer, calls: int) -> tuple[float, list[float]]:
    """``calls`` sequential calls, each for a chart never seen (fresh patient id), to one server (base URL, pid);
    bodies and tokens made before the timed calls. Returns the server's CPU seconds over them and the latencies."""
    base, pid = server
    bodies = [
        template.replace("HOOK-INSTANCE", str(uuid.uuid4())).replace(PATIENT, f"cold-{uuid.uuid4().hex[:16]}").encode()
        for _ in range(calls)
    ]
    tokens = signer.tokens(f"{base}/cds-services/{SERVICE}", calls)
    before = cpu_seconds(pid)
    latencies = asyncio.run(_sequential(base, bodies, tokens))
    return cpu_seconds(pid) - before, latencies


def cold_chart(args: argparse.Namespace) -> None:
    """One client, one call at a time, each for a chart never seen (fresh patient id: every resource misses the
    normalisation cache), on three servers started side by side: ``bare`` (bench/bare_app.py: parse the body,
    answer no cards), ``lean`` (the service as shipped) and ``full`` (``EHR_ALERTS_CDS_LEAN_READ=false``).
    Rounds interleave the three; server CPU per call from /proc (user + system) over all rounds."""
    rounds, calls = (2, 20) if args.quick else (6, 100)
    started_load = loadavg()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        signer = Signer(tmp)
        servers = {
            "bare": stack.enter_context(running_stack(tmp, signer, app="bench.bare_app:app")),
            "lean": stack.enter_context(running_stack(tmp, signer, {"EHR_ALERTS_CDS_LEAN_READ": "true"})),
            "full": stack.enter_context(running_stack(tmp, signer, {"EHR_ALERTS_CDS_LEAN_READ": "false"})),
        }
        template = request_template(datetime.now(UTC), prefetch_keys(servers["lean"][0], signer))
        cpu = dict.fromkeys(COLD_SHAPES, 0.0)
        latencies: dict[str, list[float]] = {shape: [] for shape in COLD_SHAPES}
        per_round = []
        for number in range(rounds + 1):  # round 0 warms up (imports, first-call paths), not counted
            row = {}
            for shape in COLD_SHAPES:
                used, measured = _cold_calls(servers[shape], template, signer, calls)
                row[shape] = round(used * 1000 / calls, 2)
                if number:
                    cpu[shape] += used
                    latencies[shape] += measured
            if number:
                row["lean_ratio"] = round(row["lean"] / row["bare"], 2)
                per_round.append(row)
    counted = rounds * calls
    per_call = {shape: round(cpu[shape] * 1000 / counted, 3) for shape in COLD_SHAPES}
    ratios = {shape: round(per_call[shape] / per_call["bare"], 2) for shape in ("lean", "full")}
    report = {
        "benchmark": "bench_cds --cold-chart",
        "timestamp": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "load_average_at_start": started_load,
        "load_average_at_end": loadavg(),
        "workload": {
            "rounds": rounds,
            "calls_per_round": calls,
            "prefetch_resources": count_resources(template),
            "request_bytes": len(template),
            "clients": 1,
        },
        "server_cpu_ms_per_call": per_call,
        "latency": {shape: summary(latencies[shape], sum(latencies[shape])) for shape in COLD_SHAPES},
        "ratio_to_bare": ratios,
        "per_round_cpu_ms": per_round,
        "target_ratio": COLD_TARGET_RATIO,
        "meets_target": ratios["lean"] <= COLD_TARGET_RATIO,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    output = args.output or RESULTS_DIR / ("cds-cold-quick.json" if args.quick else "cds-cold.json")
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"server CPU per call (ms): {per_call}; ratio to bare: {ratios}; target <= {COLD_TARGET_RATIO}x")
    print(f"load average {started_load} -> {report['load_average_at_end']}; written to {output}")


def cold_ab(args: argparse.Namespace) -> None:
    """Interleaved A/B of two checkouts on cold charts: the code of ``--ab-against`` (e.g. a ``git worktree`` of the
    commit before a change) and this checkout, both reading lean, served side by side; batches of cold calls
    alternate between them and server CPU per call is compared in the same run (this machine's speed moves too
    much between runs for two separate runs to show a change of a few per cent)."""
    rounds, calls = (2, 20) if args.quick else (8, 80)
    started_load = loadavg()
    roots = {"before": args.ab_against.resolve(), "after": ROOT}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        signer = Signer(tmp)
        lean = {"EHR_ALERTS_CDS_LEAN_READ": "true"}
        servers = {
            name: stack.enter_context(running_stack(tmp, signer, lean, root=root)) for name, root in roots.items()
        }
        template = request_template(datetime.now(UTC), prefetch_keys(servers["after"][0], signer))
        cpu = dict.fromkeys(roots, 0.0)
        per_round = []
        for number in range(rounds + 1):  # round 0 warms up, not counted
            row = {}
            for name, server in servers.items():
                used, _ = _cold_calls(server, template, signer, calls)
                row[name] = round(used * 1000 / calls, 2)
                if number:
                    cpu[name] += used
            if number:
                per_round.append(row)
    per_call = {name: round(cpu[name] * 1000 / (rounds * calls), 3) for name in roots}
    report = {
        "benchmark": "bench_cds --cold-chart --ab-against",
        "timestamp": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "load_average_at_start": started_load,
        "load_average_at_end": loadavg(),
        "checkouts": {name: str(root) for name, root in roots.items()},
        "workload": {"rounds": rounds, "calls_per_round": calls, "request_bytes": len(template), "clients": 1},
        "server_cpu_ms_per_call": per_call,
        "after_over_before": round(per_call["after"] / per_call["before"], 3),
        "per_round_cpu_ms": per_round,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    output = args.output or RESULTS_DIR / ("cds-cold-ab-quick.json" if args.quick else "cds-cold-ab.json")
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"server CPU per cold call (ms): {per_call}; after / before {report['after_over_before']}")
    print(f"load average {started_load} -> {report['load_average_at_end']}; written to {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few requests (smoke)")
    parser.add_argument("--output", type=Path, help="where to write the JSON results")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--cold-chart", action="store_true", help="cold-chart CPU per call against a bare POST")
    parser.add_argument(
        "--ab-against", type=Path, help="with --cold-chart: interleaved A/B against the checkout at this path"
    )
    args = parser.parse_args()
    if args.cold_chart and args.ab_against:
        cold_ab(args)
        return
    if args.cold_chart:
        cold_chart(args)
        return
    rounds, per_client = (2, 10) if args.quick else (5, 60)
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp, running_stack(Path(tmp), signer := Signer(Path(tmp))) as (base, pid):
        template = request_template(now, prefetch_keys(base, signer))
        resources = count_resources(template)
        first = httpx.post(
            f"{base}/cds-services/{SERVICE}",
            content=template.replace("HOOK-INSTANCE", str(uuid.uuid4())),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {signer.tokens(f'{base}/cds-services/{SERVICE}', 1)[0]}",
            },
            timeout=30,
        )
        first.raise_for_status()
        cards = [(c["indicator"], c["source"]["topic"]["code"]) for c in first.json()["cards"]]
        asyncio.run(run_load(base, "patient-view", template, args.clients, 5, signer))  # warm-up
        asyncio.run(run_load(base, "healthz", template, args.clients, 5, signer))
        totals: dict[str, dict[str, Any]] = {w: {"latencies": [], "wall": 0.0, "cpu": 0.0} for w in WORKLOADS}
        per_round = []
        for _ in range(rounds):
            row = {}
            for workload in WORKLOADS:
                cpu_before = cpu_seconds(pid)
                result = asyncio.run(run_load(base, workload, template, args.clients, per_client, signer))
                cpu = cpu_seconds(pid) - cpu_before
                totals[workload]["latencies"] += result["latencies"]
                totals[workload]["wall"] += result["wall"]
                totals[workload]["cpu"] += cpu
                row[workload] = summary(result["latencies"], result["wall"])
                row[workload]["server_cpu_ms_per_request"] = round(cpu * 1000 / len(result["latencies"]), 2)
            row["p95_ratio"] = round(row["patient-view"]["p95_ms"] / row["healthz"]["p95_ms"], 2)
            per_round.append(row)
    figures = {w: summary(t["latencies"], t["wall"]) for w, t in totals.items()}
    for workload, t in totals.items():
        figures[workload]["server_cpu_ms_per_request"] = round(t["cpu"] * 1000 / len(t["latencies"]), 2)
        figures[workload]["server_cpu_share"] = round(t["cpu"] / t["wall"], 2)  # of one core
    ratios = [r["p95_ratio"] for r in per_round]
    view = figures["patient-view"]
    report = {
        "benchmark": "bench_cds",
        "timestamp": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "workload": {
            "clients": args.clients,
            "rounds": rounds,
            "requests_per_client_per_round": per_client,
            "prefetch_resources": resources,
            "request_bytes": len(template),
            "cards_per_call": cards,
            "uvicorn_workers": 1,
        },
        "figures": figures,
        "per_round": per_round,
        "p95_ratio_to_healthz": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "targets": {"p95_ms": TARGET_P95_MS, "p99_ms": TARGET_P99_MS},
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "meets_targets": view["p95_ms"] <= TARGET_P95_MS and view["p99_ms"] <= TARGET_P99_MS,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    output = args.output or RESULTS_DIR / ("cds-quick.json" if args.quick else "cds.json")
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'workload':<18} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'cpu ms/req':>11} {'cpu share':>10}"
    )
    for workload, f in figures.items():
        print(
            f"{workload:<18} {f['p50_ms']:>8} {f['p95_ms']:>8} {f['p99_ms']:>8} {f['req_per_s']:>8} "
            f"{f['server_cpu_ms_per_request']:>11} {f['server_cpu_share']:>10}"
        )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"patient-view p95 / healthz p95 per round: median {report['p95_ratio_to_healthz']['median']}")
    print(f"cards per call: {cards}; targets met: {report['meets_targets']}; written to {output}")


if __name__ == "__main__":
    main()
