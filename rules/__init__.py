"""ehr-alerts rule core: FHIR -> facts normalisation, value sets, the rule file format and the engine.

Pure code: no I/O beyond reading the packaged data files, no Redis, no web. The stream workers and the
CDS Hooks service both call :func:`rules.engine.evaluate` with facts from :mod:`rules.normalize`.
"""

from rules.catalog import Catalog, RuleLoadError, load_catalog
from rules.engine import evaluate
from rules.facts import Fact
from rules.normalize import NormalizeOptions, NormalizeResult, normalize_resource, normalize_resources

__all__ = [
    "Catalog",
    "Fact",
    "NormalizeOptions",
    "NormalizeResult",
    "RuleLoadError",
    "evaluate",
    "load_catalog",
    "normalize_resource",
    "normalize_resources",
]
