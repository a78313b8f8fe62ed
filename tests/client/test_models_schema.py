"""The client's models match openapi/openapi.json: same properties, same required fields, and a
field that the schema lets be null is optional in the client. A server change that the client
misses fails here."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from lorastack.client import models

REPO = Path(__file__).resolve().parents[2]
SCHEMAS: dict[str, Any] = json.loads((REPO / "openapi" / "openapi.json").read_text())["components"][
    "schemas"
]


def _nullable(schema: dict[str, Any]) -> bool:
    options = schema.get("anyOf") or schema.get("oneOf") or [schema]
    return any(option.get("type") == "null" for option in options)


def _allows_none(annotation: Any) -> bool:
    if annotation is None or annotation is type(None):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_allows_none(arg) for arg in typing.get_args(annotation))
    return False


@pytest.mark.parametrize("model", models.ALL_MODELS, ids=lambda m: m.__name__)
def test_model_matches_its_schema_component(model: type[BaseModel]) -> None:
    name = model.__schema_name__  # type: ignore[attr-defined]
    assert name in SCHEMAS, f"{model.__name__}: no component {name} in openapi.json"
    schema = SCHEMAS[name]
    properties = schema.get("properties", {})
    assert set(model.model_fields) == set(properties), (
        f"{model.__name__} vs {name}: client-only "
        f"{sorted(set(model.model_fields) - set(properties))}, server-only "
        f"{sorted(set(properties) - set(model.model_fields))}"
    )
    required = {n for n, f in model.model_fields.items() if f.is_required()}
    if issubclass(model, models.Request):
        # Requests: the client requires exactly what the server requires.
        assert required == set(schema.get("required", [])), model.__name__
    else:
        # Responses: what the server always sends may be required; nothing else may be.
        assert required <= set(schema.get("required", [])), model.__name__
    for field_name, field in model.model_fields.items():
        if _nullable(properties[field_name]):
            assert _allows_none(field.annotation), f"{model.__name__}.{field_name} can be null"


def test_every_schema_component_the_client_reads_is_covered() -> None:
    """Every response and request component of the API has a client model (the validation
    error shapes, multipart bodies and the OpenAI-compatible route excepted)."""
    covered = {m.__schema_name__ for m in models.ALL_MODELS}  # type: ignore[attr-defined]
    not_needed = {
        "HTTPValidationError",
        "ValidationError",
        "Body_create_dataset",
        "Body_import_adapter",
        "JobKind",
        "JobStatus",
        "OpenAIImage",
        "OpenAIImageRequest",
        "OpenAIImagesResponse",
    }
    assert set(SCHEMAS) - not_needed - covered == set()


def test_job_statuses_match_the_schema_enum() -> None:
    statuses = set(SCHEMAS["JobStatus"]["enum"])
    assert statuses >= models.FINAL_STATUSES
