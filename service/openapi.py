"""Print the app's OpenAPI schema as stable JSON (``make openapi`` writes openapi/openapi.json)."""

from __future__ import annotations

import json
from typing import Any

from service.app import create_app
from service.config import Settings


def schema() -> dict[str, Any]:
    return create_app(Settings()).openapi()


def render() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
