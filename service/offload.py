"""Lanes: bounded thread pools for CPU-heavy request work, so the event loop keeps answering other requests.

A lane admits at most ``admitted`` requests at once (more get :class:`Busy`, answered 503 + Retry-After) and
runs their work on at most ``threads`` threads. Admit *before* reading a large body, so memory is bounded by
``admitted`` x the body limit::

    lane = get_lane("ingest")
    async with lane.admit():
        body = await read_body(request, ...)
        return await lane.run(work, body)

Ingestion uses the ``ingest`` lane; CDS Hooks calls and feedback the ``cds`` lane (their work on the alert store
goes through the synchronous ``workers.state`` store; the jti replay check uses ``service.aredis``). Separate
lanes keep a burst of ``$import`` requests from taking the threads CDS calls need.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from config.settings import get_settings

T = TypeVar("T")


class Busy(Exception):
    """The lane already holds as many requests as it admits."""

    def __init__(self, lane: str) -> None:
        super().__init__(lane)
        self.lane = lane


@dataclass
class Lane:
    """One bounded pool (see module docstring)."""

    name: str
    threads: int
    admitted: int
    in_flight: int = 0

    def __post_init__(self) -> None:
        # one limiter per event loop (a process has one; tests may start several)
        self._limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
            weakref.WeakKeyDictionary()
        )

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Lane]:
        """Hold a place in the lane for the request, or raise :class:`Busy` at once."""
        if self.in_flight >= self.admitted:
            raise Busy(self.name)
        self.in_flight += 1
        try:
            yield self
        finally:
            self.in_flight -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on one of the lane's threads (context variables, e.g. the request id, follow)."""
        loop = asyncio.get_running_loop()
        limiter = self._limiters.get(loop)
        if limiter is None:
            limiter = self._limiters[loop] = anyio.CapacityLimiter(self.threads)
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)


_lanes: dict[str, Lane] = {}


def _ingest_lane() -> Lane:
    settings = get_settings()
    return Lane("ingest", settings.ingest_threads, settings.ingest_max_requests)


def _cds_lane() -> Lane:
    settings = get_settings()
    return Lane("cds", settings.cds_threads, settings.cds_max_requests)


LANES: dict[str, Callable[[], Lane]] = {"ingest": _ingest_lane, "cds": _cds_lane}


def get_lane(name: str) -> Lane:
    """The process's lane ``name`` (built from the settings on first use)."""
    lane = _lanes.get(name)
    if lane is None:
        lane = _lanes[name] = LANES[name]()
    return lane


def reset_lanes() -> None:
    """Forget the lanes (tests that change the settings)."""
    _lanes.clear()
