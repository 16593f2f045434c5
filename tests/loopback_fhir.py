"""A small real FHIR server on loopback for the CDS Hooks tests (stands in for the EHR's FHIR server).

It answers searches over the resources it was given (_id, patient, code, status, clinical-status, date / authored /
authoredon / effective / effective-time ``ge``, ``_count`` with absolute next links), records every request
(path, query, Authorization header), and can be told to stall, to answer an HTTP error (for every search or
for one resource type, as a server that refuses ServiceRequest searches does), or to put an error
OperationOutcome in its Bundles.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit


def _subject_id(resource: dict[str, Any]) -> str | None:
    ref = (resource.get("subject") or {}).get("reference", "")
    return ref.split("/", 1)[1] if ref.startswith("Patient/") else None


def _tokens(resource: dict[str, Any], element: str) -> set[str]:
    value = resource.get(element) or {}
    if isinstance(value, list):
        value = value[0] if value else {}
    return {f"{c.get('system')}|{c.get('code')}" for c in value.get("coding") or []} | {
        str(c.get("code")) for c in value.get("coding") or []
    }


_DATE_PARAMS = ("date", "authored", "authoredon", "effective", "effective-time")


def _when(resource: dict[str, Any], param: str) -> str | None:
    if param in ("authored", "authoredon"):
        return resource.get("authoredOn")
    period = resource.get("effectivePeriod") or resource.get("period") or resource.get("performedPeriod") or {}
    # a period matches `ge` when it reaches the value (its end, or open); an instant by itself
    instant = resource.get("effectiveDateTime") or resource.get("performedDateTime")
    return instant or (period.get("end") or "9999" if period else None)


def matches(resource: dict[str, Any], resource_type: str, params: Iterable[tuple[str, str]]) -> bool:
    """Whether a resource answers a search (the parameters the ehr-alerts prefetch templates use)."""
    if resource.get("resourceType") != resource_type:
        return False
    for name, value in params:
        if name == "_id":
            if resource.get("id") != value:
                return False
            continue
        if name.startswith("_"):
            continue
        if name == "patient":
            if _subject_id(resource) != value:
                return False
        elif name == "code":
            if not _tokens(resource, "code") & set(value.split(",")):
                return False
        elif name == "status":
            if resource.get("status") not in value.split(","):
                return False
        elif name == "clinical-status":
            if not {t.split("|")[-1] for t in _tokens(resource, "clinicalStatus")} & set(value.split(",")):
                return False
        elif name in _DATE_PARAMS:
            when = _when(resource, name)
            if value.startswith("ge") and (when is None or when < value[2:]):
                return False
        else:
            raise ValueError(f"the loopback FHIR server does not support the parameter {name}")
    return True


@dataclass
class Recorded:
    """One request the server saw."""

    path: str
    query: list[tuple[str, str]]
    authorization: str | None


@dataclass
class LoopbackFhir:
    """Server state; ``url`` is the FHIR base."""

    resources: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    stall_seconds: float = 0.0
    fail_status: int | None = None
    refuse: dict[str, int] = field(default_factory=dict)  # resource type -> HTTP status of its searches
    outcome_error: bool = False
    url: str = ""
    _pages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def reset(self, resources: Iterable[dict[str, Any]] = ()) -> None:
        """New data, no recorded requests, normal behaviour."""
        self.resources = list(resources)
        self.requests.clear()
        self.stall_seconds, self.fail_status, self.outcome_error = 0.0, None, False
        self.refuse = {}
        self._pages.clear()

    def search(self, path: str, query: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
        """Answer one GET."""
        params = dict(query)
        if "_page" in params:
            entries = self._pages.get(params["_page"], [])
            offset = int(params.get("_offset", "0"))
        else:
            resource_type = path.rstrip("/").rsplit("/", 1)[-1]
            found = [r for r in self.resources if matches(r, resource_type, query)]
            found.sort(key=lambda r: _when(r, "date") or r.get("authoredOn") or "", reverse=True)
            key = str(len(self._pages) + 1)
            self._pages[key] = found
            entries, offset, params["_page"] = found, 0, key
        count = int(params.get("_count", "100"))
        page = entries[offset : offset + count]
        body: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(entries),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in page],
        }
        if offset + count < len(entries):
            nxt = urlencode({"_page": params["_page"], "_offset": offset + count, "_count": count})
            body["link"] = [{"relation": "next", "url": f"{self.url}/{path.strip('/').split('/')[-1]}?{nxt}"}]
        if self.outcome_error:
            body["entry"].append(
                {
                    "resource": {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "exception", "diagnostics": "search failed"}],
                    },
                    "search": {"mode": "outcome"},
                }
            )
        return 200, body


def _handler(state: LoopbackFhir) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qsl(parts.query, keep_blank_values=True)
            state.requests.append(Recorded(parts.path, query, self.headers.get("Authorization")))
            if state.stall_seconds:
                time.sleep(state.stall_seconds)
            refused = state.refuse.get(parts.path.rstrip("/").rsplit("/", 1)[-1])
            if state.fail_status or refused:
                status, body = state.fail_status or refused, {"resourceType": "OperationOutcome", "issue": []}
            else:
                status, body = state.search(parts.path.removeprefix("/fhir"), query)
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


class LoopbackServer:
    """Context manager running a LoopbackFhir on 127.0.0.1 in a thread."""

    def __init__(self) -> None:
        self.state = LoopbackFhir()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.httpd.daemon_threads = True
        self.state.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackFhir:
        self.thread.start()
        return self.state

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
