"""Loading of the packaged YAML data files (value sets, units, rule catalog)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
VALUESET_DIR = PACKAGE_DIR / "valuesets"
CATALOG_DIR = PACKAGE_DIR / "catalog"


@cache
def load_valueset(name: str) -> dict[str, Any]:
    """Load ``rules/valuesets/<name>.yaml`` once per process."""
    path = VALUESET_DIR / f"{name}.yaml"
    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data
