"""Correlation ids carried through a request or a task by context variables, added to every log record.

Only opaque ids live here (request id, CDS Hooks hookInstance, Celery task id, pseudonymised patient ref):
never names, values or tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

#: Context fields copied onto each log record (and their variables).
_FIELDS: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"ehr_alerts_{name}", default=None)
    for name in ("request_id", "hook_instance", "task_id", "patient_ref")
}
#: What an id taken from a client may look like (anything else is replaced, never logged).
SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def current() -> dict[str, str]:
    """The correlation ids set in this context."""
    return {name: value for name, var in _FIELDS.items() if (value := var.get()) is not None}


def bind(**values: str | None) -> dict[str, Token[str | None]]:
    """Set correlation ids (``request_id``, ``hook_instance``, ``task_id``, ``patient_ref``); returns reset tokens."""
    unknown = set(values) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context fields: {', '.join(sorted(unknown))}")
    return {name: _FIELDS[name].set(value) for name, value in values.items()}


def reset(tokens: dict[str, Token[str | None]]) -> None:
    """Undo a :func:`bind`."""
    for name, token in tokens.items():
        _FIELDS[name].reset(token)


@contextmanager
def bound(**values: str | None) -> Iterator[None]:
    """``with bound(task_id=...):`` sets correlation ids for the block."""
    tokens = bind(**values)
    try:
        yield
    finally:
        reset(tokens)
