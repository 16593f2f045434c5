"""Every file of the shared public data replays in embedded mode (fakeredis, eager Celery)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "shared"


def _replay(*paths: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["COLUMNS"] = "250"  # rich wraps the summary lines otherwise
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "ehr-alerts"), "replay", *map(str, paths)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_all_shared_data_replays():
    done = _replay(DATA)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert re.search(r"\b0 dead-lettered", done.stdout), done.stdout[:2000]
    assert "alert burden:" in done.stdout


def test_synthea_alone_opens_no_alert():
    done = _replay(DATA / "synthea-r4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = re.search(r"alert burden: ([0-9.]+)", done.stdout)
    assert match, done.stdout
    assert float(match.group(1)) == 0.0
    assert "No alerts opened." in done.stdout
    events = re.search(r"events: (\d+) accepted", done.stdout)
    assert events and int(events.group(1)) > 0  # the K results were read, not skipped
