"""The OpenAPI document (/openapi.json) as this server answers: FastAPI's own, completed where it cannot know.

FastAPI builds the document from the routes; `install_openapi` then walks it, adding only what the routes and
models cannot say themselves, so other additions (security schemes, refusals declared on routers) pass through:

- limits that are settings: a request field marked with `limited_by` (app/schemas.py) gets the running
  server's values (maximum, maxLength, maxItems), the same ones the handler enforces with a 422;
- error bodies: a validation error answers ErrorResponse (app/errors.py), not FastAPI's HTTPValidationError;
- refusals before the route: 413 past CHARRNN_MAX_BODY_BYTES (app/middleware.py BodyLimit) and, where a JSON
  body is read, 400 when it is not text FastAPI can decode (not UTF-8, nested too deep) and 422;
- payload models that only an event stream references (StartEvent, TokenEvent) as components.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from app import openai_schemas, schemas
from app.middleware import BodyLimit
from app.schemas import LIMITED_BY
from app.settings import Settings

REF = "#/components/schemas/"
ERROR = {"application/json": {"schema": {"$ref": REF + "ErrorResponse"}}}
OPENAI_ERROR = {"application/json": {"schema": {"$ref": REF + "OpenAIError"}}}  # under /v1/ (app/errors.py)
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` (and so /openapi.json) return FastAPI's document, completed for `settings`."""
    generate = app.openapi  # FastAPI caches its document, and builds a new one when routes change
    completed: list[dict] = []

    def openapi() -> dict[str, Any]:
        doc = generate()
        if not completed or completed[0] is not doc:
            _fill_limits(doc, settings)
            _error_bodies(doc)
            _body_refusals(doc)
            _openai_errors(doc)
            _add_referenced_models(doc)
            completed[:] = [doc]
        return doc

    app.openapi = openapi


def _nodes(value: Any) -> Iterator[dict]:
    """Every JSON object in the document, depth first."""
    if isinstance(value, dict):
        yield value
        for item in list(value.values()):
            yield from _nodes(item)
    elif isinstance(value, list):
        for item in value:
            yield from _nodes(item)


def _operations(doc: dict) -> Iterator[tuple[str, dict]]:
    for _, method, operation in _operations_by_path(doc):
        yield method, operation


def _operations_by_path(doc: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in doc.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def _fill_limits(doc: dict, settings: Settings) -> None:
    """Replace each `limited_by` marker with the keywords it names, valued from the settings."""
    for node in list(_nodes(doc)):
        limits = node.pop(LIMITED_BY, None)
        if limits is None:
            continue
        # `list[str] | None` is anyOf [array, null]: the limits belong to the non-null branch.
        targets = [s for s in node.get("anyOf", []) if s.get("type") != "null"] or [node]
        for target in targets:
            _apply(target, limits, settings)
        # A default above the limit is clamped to it, as Service.start does (max_chars 200 under a lower limit).
        if "default" in node and node["default"] is not None and "maximum" in targets[0]:
            node["default"] = min(node["default"], targets[0]["maximum"])


def _apply(target: dict, limits: dict, settings: Settings) -> None:
    for keyword, value in limits.items():
        if isinstance(value, dict):
            _apply(target.setdefault(keyword, {}), value, settings)
        else:
            target[keyword] = getattr(settings, value) if isinstance(value, str) else value


def _error_bodies(doc: dict) -> None:
    """FastAPI documents its validation errors with its own body; app/errors.py answers ErrorResponse."""
    for _, operation in _operations(doc):
        invalid = operation.get("responses", {}).get("422")
        if invalid and "HTTPValidationError" in str(invalid.get("content")):
            invalid.update(description="Invalid parameters (the message names the field or the setting).",
                           content=ERROR)
    if "HTTPValidationError" not in str(doc.get("paths")):
        definitions = doc.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            definitions.pop(name, None)


def _body_refusals(doc: dict) -> None:
    for path, method, operation in _operations_by_path(doc):
        responses = operation.setdefault("responses", {})
        error = OPENAI_ERROR if path.startswith("/v1/") else ERROR
        if method.upper() not in BodyLimit.UNLIMITED_METHODS:
            responses.setdefault("413", {"description": "Request body over CHARRNN_MAX_BODY_BYTES.",
                                         "content": error})
        if "application/json" in operation.get("requestBody", {}).get("content", {}):
            responses.setdefault("400", {"description": "The body is not JSON text (e.g. not UTF-8).",
                                         "content": error})
            if not path.startswith("/v1/"):  # OpenAI's routes answer 400 for an invalid body
                responses.setdefault("422", {"description": "Invalid body.", "content": error})


def _openai_errors(doc: dict) -> None:
    """Under /v1/ every error is OpenAI's envelope, and what we answer 422 elsewhere is 400 there."""
    for path, _, operation in _operations_by_path(doc):
        if not path.startswith("/v1/"):
            continue
        responses = operation.get("responses", {})
        invalid = responses.pop("422", None)
        if invalid is not None:
            responses.setdefault("400", {"description": "Invalid parameters.", "content": OPENAI_ERROR})
        for status, response in responses.items():
            if status[0] in "45" and response.get("content") == ERROR:
                response["content"] = OPENAI_ERROR


def _add_referenced_models(doc: dict) -> None:
    """Add the app.schemas models that the document references but FastAPI did not collect: a route
    collects only the models it reads or returns as JSON, not the payloads of its events."""
    definitions = doc.setdefault("components", {}).setdefault("schemas", {})
    referenced = {node["$ref"].removeprefix(REF) for node in _nodes(doc.get("paths"))
                  if isinstance(node.get("$ref"), str) and node["$ref"].startswith(REF)}
    missing = [getattr(schemas, name, None) or getattr(openai_schemas, name)
               for name in sorted(referenced - set(definitions))]
    if missing:
        _, top = models_json_schema([(model, "serialization") for model in missing], ref_template=REF + "{model}")
        for name, schema in top.get("$defs", {}).items():
            definitions.setdefault(name, schema)
