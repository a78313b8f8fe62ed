"""One check of every string and number a request carries, before any route code runs.

PostgreSQL refuses NUL characters in text and UTF-8 cannot encode a lone surrogate, so such a
string reaching SQL fails the statement; Python's JSON parser also admits ``NaN``,
``Infinity`` and numbers that overflow to infinity, which no limit below compares sanely.
Every router builds its routes with :class:`StrictInputRoute`, which checks the path
parameters, query, headers, form fields and JSON body up front and answers 422 naming the
field (``errors[].type`` says what was wrong), as any other validation error. The JSON body is
parsed once, here, and FastAPI reads the parsed value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from fastapi import params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

# The largest value of a 32-bit SQL integer column (sequence numbers, steps, versions).
SQL_INT_MAX = 2**31 - 1

_SURROGATE = re.compile("[\ud800-\udfff]")
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_MAX_ERRORS = 10
_NUL = ("string_nul_character", "must not contain NUL (\\u0000) characters")


def string_problem(value: str) -> tuple[str, str] | None:
    """(error type, message) when ``value`` cannot be stored as text, else None."""
    if "\x00" in value:
        return _NUL
    if _SURROGATE.search(value):
        return "string_unicode", "must be valid Unicode (no lone surrogate code points)"
    return None


def _error(loc: tuple[Any, ...], problem: tuple[str, str], value: Any) -> dict[str, Any]:
    kind, message = problem
    return {"type": kind, "loc": loc, "msg": message, "input": value}


def _json_problems(value: Any) -> Iterator[dict[str, Any]]:
    """Strings that cannot be stored and non-finite numbers anywhere in a parsed JSON value."""
    stack: list[tuple[tuple[Any, ...], Any]] = [(("body",), value)]
    while stack:
        loc, item = stack.pop()
        if isinstance(item, str):
            if problem := string_problem(item):
                yield _error(loc, problem, None)
        elif isinstance(item, float):
            if not math.isfinite(item):
                yield _error(loc, ("finite_number", "must be a finite number"), None)
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if problem := string_problem(key):
                    yield _error(loc, problem, None)
                stack.append(((*loc, key), child))
        elif isinstance(item, list):
            stack.extend(((*loc, i), child) for i, child in reversed(list(enumerate(item))))


def parse_json_body(body: bytes) -> Any:
    """Parse a JSON request body, refusing what JSON itself does not allow (422)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": f"JSON decode error: {exc.msg}",
                    "input": {},
                }
            ]
        ) from None
    except (ValueError, RecursionError) as exc:
        # Invalid UTF-8, an integer of thousands of digits, or nesting deeper than the parser.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": f"invalid JSON: {reason}"}]
        ) from None
    errors = _first(_json_problems(value))
    if errors:
        raise RequestValidationError(errors)
    return value


def _first(errors: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for error in errors:
        found.append(error)
        if len(found) == _MAX_ERRORS:
            break
    return found


def _is_json(content_type: str | None) -> bool:
    """The content types FastAPI parses as JSON."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


class _StrictRequest(Request):
    """A request whose JSON body is parsed by :func:`parse_json_body`, once."""

    _parsed: Any = None
    _has_parsed = False

    async def json(self) -> Any:
        if not self._has_parsed:
            self._parsed = parse_json_body(await self.body())
            self._has_parsed = True
        return self._parsed


def _plain_input_problems(request: Request) -> Iterator[dict[str, Any]]:
    for name, value in request.path_params.items():
        if isinstance(value, str) and (problem := string_problem(value)):
            yield _error(("path", name), problem, None)
    for name, value in request.query_params.multi_items():
        problem = string_problem(name) or string_problem(value)
        if problem:
            yield _error(("query", name), problem, None)
    for raw_name, raw_value in request.headers.raw:
        if b"\x00" in raw_name or b"\x00" in raw_value:
            yield _error(("header", raw_name.decode("latin-1")), _NUL, None)


async def _check_form(request: Request) -> None:
    # FastAPI reads the same parsed form (Starlette keeps it on the request).
    form = await request.form()
    errors: list[dict[str, Any]] = []
    for name, value in form.multi_items():
        text = value.filename or "" if isinstance(value, UploadFile) else value
        problem = string_problem(name) or string_problem(text)
        if problem:
            errors.append(_error(("body", name), problem, None))
    if errors:
        await form.close()
        raise RequestValidationError(errors[:_MAX_ERRORS])


class StrictInputRoute(APIRoute):
    """An APIRoute that refuses unstorable strings and non-finite numbers in any input."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        body_field = self.body_field
        form_body = body_field is not None and isinstance(body_field.field_info, params.Form)
        json_body = body_field is not None and not form_body

        async def strict_handler(request: Request) -> Response:
            errors = _first(_plain_input_problems(request))
            if errors:
                raise RequestValidationError(errors)
            content_type = request.headers.get("content-type")
            if json_body and _is_json(content_type):
                request = _StrictRequest(request.scope, request.receive)
                if await request.body():
                    await request.json()
            elif form_body and content_type and content_type.lower().startswith(_FORM_TYPES):
                await _check_form(request)
            return await handler(request)

        return strict_handler
