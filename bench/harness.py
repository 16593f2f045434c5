"""What the stream and backfill benchmarks share: a private Redis, the API and Celery workers as subprocesses,
CPU time per process group from ``/proc``, freezing workers while work is queued, and the machine's facts.
The other benchmarks take the smaller pieces (``free_port``, ``start_redis``, ``stop_group``, ``loadavg``).

Never touches the shared Redis (``REDIS_URL`` of the environment is replaced by the private one).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
BIN = ROOT / ".venv" / "bin"
RESULTS_DIR = BENCH / "results"
QUEUE = "ehr-alerts"
BARE_QUEUE = "bench-noop"
PREFIX = "bench"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

#: The delivery settings of ``workers.celery_app`` the bare no-op app copies (same broker round trips per task).
CELERY_KEYS = (
    "broker_transport_options",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "worker_prefetch_multiplier",
    "task_serializer",
    "accept_content",
    "task_protocol",
    "broker_connection_retry_on_startup",
)
WORKER_FLAGS = ["--pool", "prefork", "--loglevel", "warning", "--without-gossip", "--without-mingle"]
WORKER_FLAGS += ["--without-heartbeat"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(new_session: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """A private ``redis-server`` on a free loopback port, no persistence; returns the process and its URL (the
    caller waits for it to answer)."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server not found: the benchmark needs a real Redis")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=new_session,
    )
    return proc, f"redis://127.0.0.1:{port}/0"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


FEED_ISSUER = "https://bench-feed.invalid/auth"


class FeedIssuer:
    """The feed client's authorization server (SMART Backend Services): an ES384 key and its JWKS file, trusted
    by the benchmarked API through ``EHR_ALERTS_FEED_ISSUERS``; one token (``system/*.cud``) for the whole run."""

    def __init__(self, workdir: Path) -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec
        from jwt.algorithms import ECAlgorithm

        key = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        self.jwks_path = workdir / "feed-jwks.json"
        self.jwks_path.write_text(json.dumps({"keys": [{**jwk, "kid": "feed-1", "use": "sig", "alg": "ES384"}]}))
        now = int(time.time())
        claims = {"iss": FEED_ISSUER, "aud": "ehr-alerts", "iat": now, "exp": now + 6 * 3600, "jti": "bench"}
        claims |= {"sub": "bench-feed", "client_id": "bench-feed", "scope": "system/*.cud"}
        self.token = jwt.encode(claims, key, algorithm="ES384", headers={"kid": "feed-1", "typ": "JWT"})

    def env(self) -> dict[str, str]:
        return {"EHR_ALERTS_FEED_ISSUERS": json.dumps({FEED_ISSUER: str(self.jwks_path)})}


class Bench:
    """The private Redis, the API and the workers of one benchmark run."""

    def __init__(self, logs: Path, batch_size: int, extra_env: dict[str, str] | None = None) -> None:
        self.logs = logs
        self.feed = FeedIssuer(logs)
        extra_env = {**self.feed.env(), **(extra_env or {})}
        self.redis_proc, self.url = start_redis()
        self.env = {
            **os.environ,
            "REDIS_URL": self.url,
            "EHR_ALERTS_KEY_PREFIX": PREFIX,
            "EHR_ALERTS_BATCH_SIZE": str(batch_size),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        os.environ.update({k: self.env[k] for k in ("REDIS_URL", "EHR_ALERTS_KEY_PREFIX", "EHR_ALERTS_BATCH_SIZE")})
        os.environ.update(extra_env or {})
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
        # The feed is historical (2024): like ``ehr-alerts replay``, declare a feed clock so the workers' due sweep
        # does not tick every patient to today's wall clock in the middle of a measurement.
        from workers.state import keys

        self.client.set(keys.feed_clock(), "bench")
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}  # "real" / "bare" -> process group leader
        self.base_url = ""

    def _spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen(
            args, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_api(self) -> None:
        import httpx

        port = free_port()
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

    def feed_headers(self) -> dict[str, str]:
        """Headers of an ndjson ``$import`` request by the benchmark's feed client."""
        return {"Content-Type": "application/fhir+ndjson", "Authorization": f"Bearer {self.feed.token}"}

    def bare_env(self) -> dict[str, str]:
        """Environment of the bare no-op app: the broker and the project's delivery settings, nothing else."""
        from workers.celery_app import app

        conf = {k: app.conf[k] for k in CELERY_KEYS}
        return {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(BENCH),
            "PYTHONUNBUFFERED": "1",
            "BENCH_BROKER_URL": self.url,
            "BENCH_CELERY_CONF": json.dumps(conf),
        }

    def start_workers(self, processes: int, kind: str = "real") -> None:
        """Celery workers (prefork, ``processes`` children): the project's (``real``) or the bare no-op app."""
        if kind == "real":
            app, queue, env = "workers.celery_app", QUEUE, self.env
        else:
            app, queue, env = "bare_celery", BARE_QUEUE, self.bare_env()
        waiting = self._waiting_on_queues()
        proc = self._spawn(
            [str(BIN / "celery"), "-A", app, "worker", "-Q", queue, "-c", str(processes), *WORKER_FLAGS],
            f"workers-{kind}-{processes}",
            env,
        )
        self.workers[kind] = proc
        deadline = time.monotonic() + 60
        while self._waiting_on_queues() <= waiting or len(_group_pids(proc.pid)) < processes + 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {kind} workers did not start; see {self.logs}")
            time.sleep(0.1)

    def _waiting_on_queues(self) -> int:
        """Connections whose last command was BRPOP (a worker's consumer; a frozen one keeps counting)."""
        return sum(1 for c in self.client.client_list() if c.get("cmd") == "brpop")

    def freeze(self, kind: str) -> None:
        """SIGSTOP the whole worker group: it takes no CPU and no message while work is queued."""
        os.killpg(self.workers[kind].pid, signal.SIGSTOP)

    def thaw(self, kind: str) -> None:
        os.killpg(self.workers[kind].pid, signal.SIGCONT)

    def stop_workers(self, kind: str | None = None) -> None:
        for name in [kind] if kind else list(self.workers):
            proc = self.workers.pop(name, None)
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                stop_group(proc)

    def close(self) -> None:
        self.stop_workers()
        if self.api is not None:
            stop_group(self.api)
        self.redis_proc.terminate()
        self.redis_proc.wait(10)

    # --- waiting ----------------------------------------------------------------------------------------

    def wait_idle(self, *, queue: str = QUEUE, inbox_too: bool, timeout: float = 1800) -> float:
        """Poll until the queue and unacked hash (and the inbox) are empty; returns the time it was seen."""
        from workers import inbox

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(queue)
            pipe.hlen("unacked")
            queued, unacked = pipe.execute()
            if queued == 0 and unacked == 0 and (not inbox_too or inbox.size(self.client) == 0):
                return time.perf_counter()
            for kind, proc in self.workers.items():
                if proc.poll() is not None:
                    raise SystemExit(f"{kind} workers exited; see {self.logs}")
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

    # --- CPU ------------------------------------------------------------------------------------------------

    def cpu_snapshot(self, kind: str = "real") -> dict[str, float]:
        """CPU seconds so far of each component: API, the ``kind`` workers, Redis, this client."""
        proc = self.workers.get(kind)
        return {
            "api": _group_cpu(self.api.pid) if self.api else 0.0,
            "workers": _group_cpu(proc.pid) if proc else 0.0,
            "redis": _proc_cpu(self.redis_proc.pid),
            "client": time.process_time(),
        }


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group (Linux /proc)."""
    return sum(_proc_cpu(pid) for pid in _group_pids(pgid))


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ... utime(11) stime(12)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_per_item(before: dict[str, float], after: dict[str, float], items: int) -> dict[str, float]:
    """Microseconds of CPU per item, by component, between two snapshots."""
    out = {k: round(1e6 * (after[k] - before[k]) / items, 1) for k in before}
    out["total"] = round(sum(out.values()), 1)
    return out


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``); SIGKILL it after ``timeout`` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def memory_per_patient(bench: Bench, pattern: str = "bp-*") -> dict[str, Any]:
    """MEMORY USAGE of every benchmark patient key, summed by key kind, per patient."""
    by_kind: Counter[str] = Counter()
    patients: set[str] = set()
    keys = list(bench.client.scan_iter(match=f"{PREFIX}:{{p:{pattern}}}:*", count=1000))
    for i in range(0, len(keys), 5000):
        chunk = keys[i : i + 5000]
        pipe = bench.client.pipeline(transaction=False)
        for key in chunk:
            pipe.memory_usage(key, samples=0)
        for key, size in zip(chunk, pipe.execute(), strict=True):
            patient, _, rest = key.partition("}:")
            kind = rest.split(":", 1)[0]  # facts, meta, alerts, history (one per alert), ...
            patients.add(patient)
            by_kind[kind] += size or 0
    n = max(len(patients), 1)
    timeline = sum(v for k, v in by_kind.items() if k not in ("alerts", "open", "history"))
    return {
        "patients": len(patients),
        "bytes_per_patient": {kind: round(v / n) for kind, v in sorted(by_kind.items())},
        "timeline_bytes_per_patient": round(timeline / n),
        "all_keys_bytes_per_patient": round(sum(by_kind.values()) / n),
        "used_memory_bytes": int(bench.client.info("memory")["used_memory"]),
    }


# --- ingestion over HTTP ---------------------------------------------------------------------------------


def ndjson_bodies(resources: list[dict[str, Any]], chunk: int) -> list[bytes]:
    """The feed as ndjson request bodies of ``chunk`` lines each."""
    return [
        "\n".join(json.dumps(r, separators=(",", ":")) for r in resources[i : i + chunk]).encode()
        for i in range(0, len(resources), chunk)
    ]


def post_all(bench: Bench, bodies: list[bytes], threads: int = 2) -> Counter[str]:
    """POST every body to ``/fhir/$import`` (``threads`` clients in parallel); returns the summed entry outcomes."""
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
                    headers=bench.feed_headers(),
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


# --- what the results record -------------------------------------------------------------------------------


def git_commit() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "subject": git("log", "-1", "--format=%s")[:120],
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def machine() -> dict[str, Any]:
    """Python, CPUs, platform, Celery / kombu / Redis versions."""
    from importlib import metadata

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "celery": metadata.version("celery"),
        "kombu": metadata.version("kombu"),
        "redis_py": metadata.version("redis"),
        "redis_server": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
    }


def stamp() -> dict[str, Any]:
    """Time and load average now (recorded at the start and the end of every run)."""
    return {"at": datetime.now(UTC).isoformat(timespec="seconds"), "loadavg_1_5_15": loadavg()}


def ensure_path() -> None:
    """The project and ``bench/`` importable from a script run as ``python bench/x.py``."""
    for path in (str(ROOT), str(BENCH)):
        if path not in sys.path:
            sys.path.insert(0, path)


# --- profiling (optional: py-spy is not a dependency of the project) ----------------------------------------


class Profiler:
    """``py-spy record`` attached to processes (raw collapsed stacks), stopped with SIGINT; :func:`top_frames`
    sums the samples. Sampling pauses the processes briefly, so a profiled drain is never a measured one."""

    def __init__(self, py_spy: str, out_dir: Path, rate: int = 200) -> None:
        self.py_spy, self.out_dir, self.rate = py_spy, out_dir, rate
        self.running: list[tuple[subprocess.Popen[bytes], Path]] = []

    def attach(self, pids: list[int], name: str) -> None:
        for pid in pids:
            out = self.out_dir / f"{name}-{pid}.txt"
            args = [self.py_spy, "record", "--pid", str(pid), "--format", "raw", "-r", str(self.rate), "-o", str(out)]
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.running.append((proc, out))

    def stop(self) -> list[Path]:
        for proc, _ in self.running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc, _ in self.running:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        files = [out for _, out in self.running if out.exists()]
        self.running = []
        return files


def top_frames(files: list[Path], limit: int = 40) -> dict[str, Any]:
    """Share of samples per function (inclusive: anywhere on the stack; self: the innermost frame)."""
    import re

    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    share = {f: round(100 * n / max(total, 1), 1) for f, n in inclusive.most_common() if n < total}
    return {
        "samples": total,
        "inclusive_percent": dict(list(share.items())[:limit]),
        "self_percent": {f: round(100 * n / max(total, 1), 1) for f, n in own.most_common(limit // 2)},
    }


def pool_children(pgid: int) -> list[int]:
    """The pool processes of a worker group (every process but the group leader)."""
    return [pid for pid in _group_pids(pgid) if pid != pgid]
