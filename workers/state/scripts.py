"""The Lua scripts of the Redis state, and running one script for many patients in one round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

_LUA_DIR = Path(__file__).with_name("lua")


def load_script(client: redis.Redis, name: str) -> Any:
    """A registered script (``workers/state/lua/<name>``), called with ``keys=`` and ``args=``."""
    return client.register_script((_LUA_DIR / name).read_text(encoding="utf-8"))


def run_pipelined(client: redis.Redis, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
    """EVALSHA ``script`` once per (keys, args) in one pipeline, in order; loads the script if the server lost
    it. Per call its reply, or the error it raised; connection errors raise."""
    if not calls:
        return []
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for script_keys, args in calls:
            pipe.evalsha(script.sha, len(script_keys), *script_keys, *args)
        results = pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, redis.ConnectionError | redis.TimeoutError):
                raise result
        if attempt == 1 and any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
            script.sha = client.script_load(script.script)  # e.g. the server restarted; retry all
            continue  # (each script is idempotent, so re-running the ones that did run is harmless)
        return results
    raise AssertionError("unreachable")
