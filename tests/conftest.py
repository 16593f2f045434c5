"""Fixtures for the rule-engine tests. The FHIR builders and helpers live in ``fhir_builders.py`` (a module
with a unique name, so it cannot be shadowed by another directory's ``conftest``)."""

from __future__ import annotations

import pytest
from fhir_builders import packaged_catalog

from rules.catalog import Catalog


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    """The packaged, self-tested rule catalog (loaded once)."""
    return packaged_catalog()
