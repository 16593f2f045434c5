"""The CDS services this deployment offers and the prefetch each one asks for.

Everything is derived from the loaded rule catalog and the value sets: which concepts the active rules read
decides which prefetch keys exist, ``rules/valuesets/labs.yaml`` gives the LOINC codes, ``orders.yaml`` the
order concepts, and the rules' look-back parameters give the date window of the service's own searches.
Prefetch templates use only CDS Hooks 2.0 tokens (``{{context.patientId}}``); 2.0 has no date arithmetic,
so templates ask for the newest results first (``_sort=-date``) and the engine applies the windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from rules.catalog import Catalog
from rules.codes import LOINC
from rules.datafiles import load_valueset
from rules.medications import known_classes
from rules.model import Rule
from rules.orders import order_index

HOOKS = ("patient-view", "order-select", "order-sign")
USAGE = (
    "Send every prefetch key, or fhirServer (https) with fhirAuthorization so the service can search what is "
    "missing; a call whose data cannot be had answers 412. Authenticate with a CDS Hooks client JWT (ES384 or "
    "RS384) from a registered issuer. Feedback is accepted at {id}/feedback."
)
LAB_KEYS = ("potassium", "magnesium", "qtc", "egfr", "creatinine")
_CONDITION_ACTIVE = "active,recurrence,relapse"
#: Concepts the engine reads for every rule's applicability (rules/context.py): who the patient is, and where.
PATIENT_CONCEPT, ENCOUNTER_CONCEPT = "patient", "encounter"


@dataclass(frozen=True)
class PrefetchQuery:
    """One prefetch key: a FHIR search template and the date window of the service's own search."""

    key: str
    resource_type: str
    params: tuple[tuple[str, str], ...]  # values may hold 2.0 tokens such as {{context.patientId}}
    date_param: str | None = None  # search parameter for the window (date / authored / effective ...)
    window_hours: float | None = None  # None: no date filter
    sort: str | None = None
    concepts: frozenset[str] = frozenset()  # the rule concepts whose facts this key supplies
    label: str = ""  # what the key holds, in words (cards and errors say what could not be checked)
    read: str | None = None  # a read by id instead of a search: ``{{context.patientId}}`` -> Patient/<id>

    def template(self, page_size: int) -> str:
        """The 2.0 prefetch template advertised in discovery."""
        if self.read:
            return f"{self.resource_type}/{self.read}"
        parts = [f"{name}={value}" for name, value in self.params]
        if self.sort:
            parts.append(f"_sort={self.sort}")
        parts.append(f"_count={page_size}")
        return f"{self.resource_type}?{'&'.join(parts)}"

    def own_search(self, tokens: dict[str, str], as_of: datetime, page_size: int) -> tuple[str, list[tuple[str, str]]]:
        """(resource type, query parameters) for fetching this key from the FHIR server, window applied (a read by id
        is fetched as the equivalent ``_id`` search, whose Bundle the prefetch reader takes like any other)."""
        if self.read:
            return self.resource_type, [("_id", substitute(self.read, tokens))]
        params = [(name, substitute(value, tokens)) for name, value in self.params]
        if self.date_param and self.window_hours is not None:
            start = as_of - timedelta(hours=self.window_hours)
            params.append((self.date_param, "ge" + start.strftime("%Y-%m-%dT%H:%M:%SZ")))
        if self.sort:
            params.append(("_sort", self.sort))
        params.append(("_count", str(page_size)))
        return self.resource_type, params


@dataclass(frozen=True)
class CdsService:
    """One entry of the discovery document."""

    id: str
    hook: str
    title: str
    description: str
    prefetch: tuple[PrefetchQuery, ...]

    def discovery(self, page_size: int) -> dict[str, object]:
        """The discovery entry (CDS Hooks 2.0.1 §Discovery)."""
        return {
            "hook": self.hook,
            "title": self.title,
            "description": self.description,
            "id": self.id,
            "prefetch": {q.key: q.template(page_size) for q in self.prefetch},
            "usageRequirements": USAGE.format(id=self.id),
        }


def substitute(template: str, tokens: dict[str, str]) -> str:
    """Replace ``{{name}}`` tokens; unknown tokens raise KeyError (our templates only use known ones)."""
    out = template
    while "{{" in out:
        start = out.index("{{")
        end = out.index("}}", start)
        name = out[start + 2 : end].strip()
        out = out[:start] + tokens[name] + out[end + 2 :]
    return out


def _input_windows(rules: list[Rule], kind: str | None = None) -> dict[str, list[float | None]]:
    """Per concept, the look-back (hours, anchor included) of every input reading it (only inputs that may read
    facts of ``kind``, when given); None = whole record. Patient context: ``patient`` for every rule (age,
    deceased), ``encounter`` over the rule's encounter look-back when it names encounter classes."""
    windows: dict[str, list[float | None]] = {}
    for rule in rules:
        windows.setdefault(PATIENT_CONCEPT, []).append(None)
        if rule.applicability.encounter_classes is not None:
            windows.setdefault(ENCOUNTER_CONCEPT, []).append(rule.applicability.encounter_lookback_hours)
        for spec in rule.inputs.values():
            if kind is not None and spec.kinds is not None and kind not in spec.kinds:
                continue
            hours: float | None = None
            window = rule.inputs[spec.since] if spec.since else spec  # `since` counts from another input's fact
            if window.lookback:
                hours = rule.parameters[window.lookback].hours or 0.0
                anchor = rule.inputs[window.anchor] if window.anchor else None
                if anchor is not None and anchor.lookback:
                    hours += rule.parameters[anchor.lookback].hours or 0.0
            elif spec.select == "active" and not spec.since:
                hours = 0.0  # active now
            for concept in spec.concepts:
                windows.setdefault(concept, []).append(hours)
    return windows


def _widest(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else max(v or 0.0 for v in values)


def _codes(concepts: list[str]) -> str:
    labs = load_valueset("labs")["concepts"]
    return ",".join(f"{LOINC}|{item['code']}" for concept in concepts for item in labs[concept]["codes"])


def prefetch_queries(rules: list[Rule]) -> tuple[PrefetchQuery, ...]:
    """The prefetch keys the given rules need."""
    windows = _input_windows(rules)
    used = set(windows)
    patient = ("patient", "{{context.patientId}}")
    queries: list[PrefetchQuery] = []
    for concept in LAB_KEYS:
        if concept in used:
            queries.append(
                PrefetchQuery(
                    concept,
                    "Observation",
                    (patient, ("code", _codes([concept]))),
                    "date",
                    _widest(windows[concept]),
                    "-date",
                    frozenset({concept}),
                    _LABELS[concept],
                )
            )
    if PATIENT_CONCEPT in used:
        queries.append(
            PrefetchQuery("patient", "Patient", (), concepts=frozenset({PATIENT_CONCEPT}), label=_LABELS["patient"],
                          read="{{context.patientId}}")
        )  # fmt: skip
    if ENCOUNTER_CONCEPT in used:  # every encounter touching the rules' encounter look-back, newest first
        queries.append(
            PrefetchQuery("encounter", "Encounter", (patient,), "date", _widest(windows[ENCOUNTER_CONCEPT]), "-date",
                          frozenset({ENCOUNTER_CONCEPT}), _LABELS["encounter"])
        )  # fmt: skip
    if "arrhythmia" in used:
        findings = _input_windows(rules, kind="finding")["arrhythmia"]  # ECG findings, not diagnoses
        ecg = frozenset({"arrhythmia", "qtc"} & used)  # an ECG gives rhythm findings and a QTc component
        queries.append(
            PrefetchQuery("ecg", "Observation", (patient, ("code", _codes(["ecg"]))), "date",
                          _widest(findings), "-date", ecg, _LABELS["ecg"])
        )  # fmt: skip
    diagnoses = frozenset({"arrhythmia", "dialysis"} & used)
    if diagnoses:
        queries.append(
            PrefetchQuery("conditions", "Condition", (patient, ("clinical-status", _CONDITION_ACTIVE)),
                          concepts=diagnoses, label=_LABELS["conditions"])
        )  # fmt: skip
    if "dialysis" in used:  # dialysis sessions as far back as the widest dialysis window
        queries.append(
            PrefetchQuery("procedures", "Procedure", (patient, ("status", "completed,in-progress")), "date",
                          _widest(windows["dialysis"]), "-date", frozenset({"dialysis"}), _LABELS["procedures"])
        )  # fmt: skip
    drugs = frozenset(used & set(known_classes()))
    if drugs:
        # Ongoing records whatever their age; finished ones and administrations only as far back as the widest
        # medication window (a completed order counts for the time it was active, issue 10 item 12).
        ongoing = ("status", "active,on-hold")
        recent = _widest([w for c in sorted(drugs) for w in windows[c]])
        for key, kind in (("medicationStatements", "MedicationStatement"), ("medicationRequests", "MedicationRequest")):
            queries.append(PrefetchQuery(key, kind, (patient, ongoing), concepts=drugs, label=_LABELS[key]))
        finished = ("status", "completed,stopped")
        queries.append(
            PrefetchQuery("medicationStatementsFinished", "MedicationStatement", (patient, finished), "effective",
                          recent, "-effective", drugs, _LABELS["medicationStatementsFinished"])
        )  # fmt: skip
        queries.append(
            PrefetchQuery("medicationRequestsFinished", "MedicationRequest", (patient, finished), "authoredon",
                          recent, "-authoredon", drugs, _LABELS["medicationRequestsFinished"])
        )  # fmt: skip
        given = ("status", "completed,in-progress,stopped")
        queries.append(
            PrefetchQuery("medicationAdministrations", "MedicationAdministration", (patient, given), "effective-time",
                          recent, "-effective-time", drugs, _LABELS["medicationAdministrations"])
        )  # fmt: skip
    orders = order_index()
    by_concept = _order_labs(orders)
    lab_orders = sorted({lab for concept, labs in by_concept.items() if concept in used for lab in labs})
    if lab_orders:
        order_windows = [w for concept in by_concept if concept in used for w in windows[concept]]
        queries.append(
            PrefetchQuery(
                "serviceRequests",
                "ServiceRequest",
                (patient, ("status", "active"), ("code", _codes(lab_orders))),
                "authored",
                _widest(order_windows),
                concepts=frozenset(c for c in by_concept if c in used),
                label=_LABELS["serviceRequests"],
            )
        )
    return tuple(queries)


_LABELS = {
    "potassium": "potassium results",
    "magnesium": "magnesium results",
    "qtc": "QTc measurements",
    "egfr": "eGFR results",
    "creatinine": "creatinine results",
    "patient": "the patient's age (Patient)",
    "encounter": "encounters (where the patient is cared for)",
    "procedures": "dialysis procedures",
    "ecg": "ECG findings",
    "conditions": "arrhythmia and dialysis diagnoses (Condition)",
    "medicationStatements": "medication statements",
    "medicationRequests": "medication orders",
    "medicationStatementsFinished": "finished medication statements",
    "medicationRequestsFinished": "finished medication orders",
    "medicationAdministrations": "medication administrations",
    "serviceRequests": "lab orders (ServiceRequest)",
}


def concepts_read_by(rule: Rule) -> frozenset[str]:
    """The concepts a rule reads: its inputs' and its applicability's (patient; encounter when it names classes)."""
    concepts = {c for spec in rule.inputs.values() for c in spec.concepts} | {PATIENT_CONCEPT}
    if rule.applicability.encounter_classes is not None:
        concepts.add(ENCOUNTER_CONCEPT)
    return frozenset(concepts)


def keys_read_by(rule: Rule, queries: tuple[PrefetchQuery, ...]) -> frozenset[str]:
    """The prefetch keys that supply facts of a concept the rule reads."""
    concepts = concepts_read_by(rule)
    return frozenset(q.key for q in queries if q.concepts & concepts)


def _order_labs(orders: object) -> dict[str, list[str]]:
    by_concept: dict[str, list[str]] = {}
    for lab, concepts in orders.by_lab.items():  # type: ignore[attr-defined]
        for concept in concepts:
            by_concept.setdefault(concept, []).append(lab)
    return by_concept


_TITLES = {
    "patient-view": "Magnesium and potassium alerts",
    "order-select": "Magnesium check for potassium and diuretic orders",
    "order-sign": "Magnesium check before signing potassium and diuretic orders",
}
_WHAT = {
    "patient-view": "when the chart is opened",
    "order-select": "while orders are selected (draft potassium, diuretic and magnesium orders are taken into account)",
    "order-sign": "before orders are signed (draft potassium, diuretic and magnesium orders are taken into account)",
}


def services(catalog: Catalog) -> tuple[CdsService, ...]:
    """One service per hook, each covering every active rule of the catalog."""
    rules = [r for r in catalog.rules if r.status == "active"]
    queries = prefetch_queries(rules)
    titles = "; ".join(r.title for r in rules)
    return tuple(
        CdsService(
            id=f"mg-k-{hook}",
            hook=hook,
            title=_TITLES[hook],
            description=f"Magnesium/potassium decision support {_WHAT[hook]}. Rules: {titles}.",
            prefetch=queries,
        )
        for hook in HOOKS
    )
