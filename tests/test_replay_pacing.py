"""A replay with real workers queues no more than its backlog of unfinished batches at a time (no redelivery
storm on a large extract), and never hangs when no worker consumes."""

from __future__ import annotations

from typing import Any

import pytest

from service import replay
from service.ingest import Enqueuer


class _Inbox:
    """Inbox sizes seen in turn (the last one repeats)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.reads = 0

    def size(self, _client: Any) -> int:
        value = self.sizes[min(self.reads, len(self.sizes) - 1)]
        self.reads += 1
        return value


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batches passed on to the real submit (recorded instead of sent)."""
    sent: list[int] = []

    def fake_flush(self: Enqueuer) -> None:
        sent.append(len(self.pending))
        self.pending = []

    monkeypatch.setattr(Enqueuer, "flush", fake_flush)
    monkeypatch.setattr(replay, "get_store", lambda: type("S", (), {"client": None})())
    monkeypatch.setattr(replay.time, "sleep", lambda _s: None)
    return sent


def _with_pending(enqueuer: Enqueuer, n: int) -> Enqueuer:
    enqueuer.pending = [object()] * n  # type: ignore[list-item]
    return enqueuer


def test_waits_while_the_backlog_is_full(monkeypatch: pytest.MonkeyPatch, flushed: list[int]) -> None:
    inbox = _Inbox([20, 20, 19])
    monkeypatch.setattr(replay.inbox, "size", inbox.size)
    enqueuer = _with_pending(replay.PacedEnqueuer(backlog=20, timeout=60), 200)
    enqueuer.flush()
    assert inbox.reads == 3  # waited through two full readings
    assert flushed == [200]
    assert not enqueuer.stalled


def test_does_not_wait_with_room(monkeypatch: pytest.MonkeyPatch, flushed: list[int]) -> None:
    inbox = _Inbox([0])
    monkeypatch.setattr(replay.inbox, "size", inbox.size)
    enqueuer = _with_pending(replay.PacedEnqueuer(backlog=20, timeout=60), 5)
    enqueuer.flush()
    assert (inbox.reads, flushed) == (1, [5])


def test_no_worker_consuming_stops_pacing_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch, flushed: list[int]
) -> None:
    inbox = _Inbox([50])
    monkeypatch.setattr(replay.inbox, "size", inbox.size)
    enqueuer = _with_pending(replay.PacedEnqueuer(backlog=20, timeout=0), 200)
    enqueuer.flush()
    assert enqueuer.stalled and flushed == [200]
    reads = inbox.reads
    _with_pending(enqueuer, 200).flush()
    assert inbox.reads == reads  # stalled: queues the rest without waiting again
    assert flushed == [200, 200]


def test_an_empty_flush_never_waits(monkeypatch: pytest.MonkeyPatch, flushed: list[int]) -> None:
    inbox = _Inbox([50])
    monkeypatch.setattr(replay.inbox, "size", inbox.size)
    replay.PacedEnqueuer(backlog=20, timeout=60).flush()
    assert inbox.reads == 0
