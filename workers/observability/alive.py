"""Worker liveness probe: ``python -m workers.observability.alive`` exits 0 when this container's worker
touched its heartbeat file within ``EHR_ALERTS_WORKER_HEARTBEAT_MAX_AGE`` seconds, else 1 with the reason.

Imports only the settings (fast enough for a Kubernetes exec probe); ``ehr-alerts worker-alive`` does the same.
"""

from __future__ import annotations

import sys

from config.settings import get_settings
from workers.observability.heartbeat import file_alive


def check(max_age: float | None = None) -> tuple[bool, str]:
    """Whether the heartbeat file is fresh, and the reason."""
    settings = get_settings()
    return file_alive(settings.worker_heartbeat_file, max_age or settings.worker_heartbeat_max_age)


def main() -> int:
    """Print the verdict; exit status 0 alive, 1 not alive."""
    alive, reason = check()
    print(("alive: " if alive else "not alive: ") + reason, file=sys.stdout if alive else sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
