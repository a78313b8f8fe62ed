"""Property-based requests over the whole OpenAPI document (schemathesis).

Every operation gets requests generated from its schema, both fitting it (positive) and not
(negative), sent through the ASGI app on the real database and Redis with a valid API key and
a live worker; none may answer 5xx and every answer must match the schema declared for its
status. The run is derandomized and bounded (``MAX_EXAMPLES`` per operation and mode), so it
is the same run every time and fits CI.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.app import create_app
from tests.conftest import Stack, new_tenant_headers

MAX_EXAMPLES = 8
CHECKS = [not_a_server_error, response_schema_conformance]
# Waits and generation sizes are capped so that no generated request can block for long.
LIMITS = {
    "generate_default_wait_s": 0.5,
    "generate_max_wait_s": 1.0,
    "generate_max_steps": 2,
    "generate_max_pixels": 64 * 64,
    "generate_max_side": 64,
    "generate_max_images": 1,
}


def test_no_server_errors_and_answers_match_the_schema(
    stack: Stack, worker: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(stack.settings.model_copy(update=LIMITS))
    )
    headers = new_tenant_headers(stack)
    counts: dict[str, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=MAX_EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                label = case.operation.label
                counts[label] = counts.get(label, 0) + 1
                case.call_and_validate(headers=headers, checks=CHECKS)

            try:
                check()
            except Unsatisfiable:
                pass  # nothing in this operation's schema can be negated (no parameters)
            except Exception as exc:  # collected: one report for every operation
                failures.append(f"{operation.label} ({mode}): {exc}")
    total = sum(counts.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} cases over {len(counts)} operations")
    assert not failures, "\n\n".join(failures)
    assert len(counts) >= 32, sorted(counts)  # every operation ran
