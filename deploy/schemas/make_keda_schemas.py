"""Write the JSON Schemas of the KEDA objects the chart uses (ScaledObject, TriggerAuthentication).

They come from the KEDA models of the PyPI package ``cloudcoil.models.keda`` (generated from KEDA's CRDs),
made strict (``additionalProperties: false`` wherever the CRD lists the properties) so a misspelt field
fails. The result is committed; the manifest test (tests/test_deploy.py) validates with it offline.
Regenerate after a KEDA upgrade:

    python -m venv /tmp/keda && /tmp/keda/bin/pip install cloudcoil.models.keda
    /tmp/keda/bin/python deploy/schemas/make_keda_schemas.py
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication


def strict(node: Any) -> Any:
    """Close every object schema that names its properties."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def main() -> None:
    """Write one schema file per kind next to this script."""
    here = Path(__file__).parent
    for model in (ScaledObject, TriggerAuthentication):
        schema = strict(model.model_json_schema(by_alias=True, mode="validation"))
        schema["$comment"] = f"generated from cloudcoil.models.keda {version('cloudcoil.models.keda')}"
        name = f"keda-{model.__name__.lower()}-v1alpha1.json"
        (here / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
