"""``/docs`` (Swagger UI) and ``/openapi.json``: served with the Swagger UI assets bundled in the
``swagger-ui-bundle`` package (no CDN: hospital networks are often offline), open in the dev profile and
for signed-in review users in production (``service.security.access.docs_reader``). ReDoc is not served.

The OpenAPI document also describes the bodies that routes read themselves (FHIR resources and Bundles,
ndjson, CDS Hooks requests and feedback), so clients and schemathesis can reach them.
"""

from __future__ import annotations

from typing import Any

import swagger_ui_bundle
from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from service.security.access import docs_reader

ASSETS = "/docs/assets"
_ID = {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"}
SCHEMAS: dict[str, Any] = {
    "FhirResource": {
        "type": "object",
        "description": "A FHIR R4 resource (JSON)",
        "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string"}, "id": _ID},
        "additionalProperties": True,
    },
    "FhirBundle": {
        "type": "object",
        "description": "A FHIR R4 Bundle: transaction, batch, collection or a subscription notification (history)",
        "required": ["resourceType"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["Bundle"]},
            "type": {"type": "string", "enum": ["transaction", "batch", "collection", "history"]},
            "entry": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "fullUrl": {"type": "string"},
                        "resource": {"$ref": "#/components/schemas/FhirResource"},
                        "request": {
                            "type": "object",
                            "properties": {
                                "method": {"type": "string", "enum": ["POST", "PUT", "DELETE"]},
                                "url": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
    "CdsHookRequest": {
        "type": "object",
        "description": "A CDS Hooks 2.0 service request",
        "required": ["hook", "hookInstance", "context"],
        "properties": {
            "hook": {"type": "string", "enum": ["patient-view", "order-select", "order-sign"]},
            "hookInstance": {"type": "string", "format": "uuid"},
            "fhirServer": {"type": "string", "format": "uri"},
            "context": {
                "type": "object",
                "properties": {"userId": {"type": "string"}, "patientId": _ID, "encounterId": {"type": "string"}},
            },
            "prefetch": {"type": "object", "additionalProperties": True},
        },
    },
    "CdsFeedback": {
        "type": "object",
        "description": "CDS Hooks 2.0 feedback",
        "required": ["feedback"],
        "properties": {
            "feedback": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["card", "outcome", "outcomeTimestamp"],
                    "properties": {
                        "card": {"type": "string"},
                        "outcome": {"type": "string", "enum": ["accepted", "overridden"]},
                        "outcomeTimestamp": {"type": "string", "format": "date-time"},
                        "acceptedSuggestions": {"type": "array", "items": {"type": "object"}},
                        "overrideReason": {"type": "object"},
                    },
                },
            }
        },
    },
}
#: Routes that read their JSON body themselves: (path, method) -> schema name.
BODIES = {
    ("/cds-services/{service_id}", "post"): "CdsHookRequest",
    ("/cds-services/{service_id}/feedback", "post"): "CdsFeedback",
}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with the self-read bodies described (built once)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
        for (path, method), name in BODIES.items():
            operation = schema.get("paths", {}).get(path, {}).get(method)
            if operation is not None and "requestBody" not in operation:
                content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
                operation["requestBody"] = {"required": True, "content": content}
        app.openapi_schema = schema
    return app.openapi_schema


def install(app: FastAPI) -> None:
    """Add ``/openapi.json``, ``/docs`` and the bundled assets."""
    guard = [Depends(docs_reader)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guard)
    def openapi_json() -> JSONResponse:
        return JSONResponse(openapi_document(app))

    @app.get("/docs", include_in_schema=False, dependencies=guard)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )

    app.mount(ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger-ui-assets")
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
