"""A bare Celery app with one no-op task: the per-task cost floor the stream benchmark compares against.

It imports nothing of the project: no JSON logging, no signals, no bootsteps (inbox or due sweeps, heartbeat),
no settings. Only the broker and the delivery settings are the project's, handed over by the benchmark in
``BENCH_CELERY_CONF`` (JSON: the values ``workers.celery_app`` runs with: late acks, reject on worker lost,
prefetch multiplier, serializer, transport options, no results), so the baseline pays the same broker round
trips per task as the real workers do.

Used two ways by ``bench/bench_stream.py``:

* as a worker: ``celery -A bare_celery worker -Q bench-noop ...`` (``bench/`` on ``PYTHONPATH``);
* as a publisher: ``python bench/bare_celery.py publish FEED.json`` sends one task per resource of the file,
  so the publishing process carries no project import either (and its CPU is not the worker's).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from celery import Celery

QUEUE = "bench-noop"

app = Celery("bare", broker=os.environ.get("BENCH_BROKER_URL", "memory://"))
app.conf.update(json.loads(os.environ.get("BENCH_CELERY_CONF", "{}")))
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True, result_backend=None)


@app.task(name="bench.noop")
def noop(event: dict[str, Any]) -> None:
    """Does nothing."""


def publish(path: str) -> int:
    """One no-op task per item of the JSON list in ``path``; returns how many."""
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    for item in items:
        noop.delay(item)
    return len(items)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "publish":
        raise SystemExit("usage: bare_celery.py publish FEED.json")
    print(publish(sys.argv[2]))
