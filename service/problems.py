"""RFC 9457 problem details: the one place errors become HTTP (``application/problem+json``,
or the OpenAI error shape under ``/v1/``) and their declaration in the OpenAPI document.

The errors themselves are in ``service.errors``, which imports no web framework."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from service.errors import ServiceError

PROBLEM_CONTENT_TYPE = "application/problem+json"
# Routes under this prefix speak the OpenAI API: errors are {"error": {...}} as its SDKs expect.
OPENAI_PREFIX = "/v1/"


class FieldError(BaseModel):
    field: str
    message: str
    type: str | None = None


class Problem(BaseModel):
    """An RFC 9457 problem; some codes add members (``errors``, ``report``, ``job_id``...)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="https://lorastack.dev/problems/<code>")
    title: str
    status: int
    detail: str
    code: str = Field(description="stable, machine-readable")
    instance: str | None = None
    errors: list[FieldError] | None = Field(None, description="422: each field in error")


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class OpenAIError(BaseModel):
    """The error shape of the OpenAI API, answered under /v1/."""

    error: OpenAIErrorBody


_STATUS_MEANING = {
    400: "malformed request",
    401: "missing, invalid or revoked API key",
    404: "no such resource (or another tenant's)",
    405: "method not allowed; `Allow` lists the path's methods",
    409: "conflicts with the resource's state",
    413: "request body over a size cap",
    415: "unsupported content type",
    416: "range outside the file",
    422: "invalid input; `errors` names each field",
    429: "over a quota or rate limit; see Retry-After",
    500: "internal error; nothing was applied",
    503: "a dependency is unavailable or the work did not finish in time",
}


def problem_responses(
    *statuses: int, openai: bool = False, descriptions: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` declaring each error status with its body schema.

    FastAPI files a response ``model`` under application/json; :func:`install_problem_openapi`
    moves it to application/problem+json.
    """
    model: type[BaseModel] = OpenAIError if openai else Problem
    media = "application/json" if openai else PROBLEM_CONTENT_TYPE
    meaning = {**_STATUS_MEANING, **(descriptions or {})}
    return {
        status: {
            "model": model,
            "description": meaning.get(status, HTTPStatus(status).phrase),
            "content": {media: {}},
        }
        for status in statuses
    }


def install_problem_openapi(app: FastAPI) -> None:
    """Make the OpenAPI document give problem answers the application/problem+json type."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                for answer in operation.get("responses", {}).values():
                    content = answer.get("content", {})
                    if PROBLEM_CONTENT_TYPE in content and "application/json" in content:
                        content[PROBLEM_CONTENT_TYPE] = content.pop("application/json")
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# Errors any authenticated route can answer: bad input, no key, body over a cap, validation.
COMMON_ERRORS = (400, 401, 413, 422, 500)


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_response(
    *,
    status: int,
    code: str,
    detail: str,
    instance: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error answer for ``instance`` (the request path): OpenAI-shaped under /v1/, else
    problem+json."""
    if instance is not None and instance.startswith(OPENAI_PREFIX):
        errors = (extra or {}).get("errors") or []
        param = errors[0].get("field") if errors and isinstance(errors[0], dict) else None
        error = OpenAIErrorBody(message=detail, type=_openai_type(status), code=code, param=param)
        return JSONResponse(
            OpenAIError(error=error).model_dump(), status_code=status, headers=headers
        )
    return problem_response(
        status=status, code=code, detail=detail, instance=instance, extra=extra, headers=headers
    )


def problem_response(
    *,
    status: int,
    code: str,
    detail: str,
    instance: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://lorastack.dev/problems/{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(extra or {})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers)


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or ".".join(str(p) for p in loc)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (FastAPI has one route per method)."""
    methods: set[str] = set()
    path = request.scope["path"]
    for route in iter_route_contexts(request.app.router.routes):
        if route.path and route.methods and compile_path(route.path)[0].match(path):
            methods.update(route.methods)
    return ", ".join(sorted(methods))


def install_problem_handlers(app: FastAPI) -> None:
    """Every error the app can answer becomes application/problem+json."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(
            status=exc.status,
            code=exc.code,
            detail=exc.detail,
            instance=request.url.path,
            extra=exc.extra,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": _field_path(err.get("loc", ())),
                "message": err.get("msg", ""),
                "type": err.get("type", ""),
            }
            for err in exc.errors()
        ]
        first = errors[0] if errors else {"field": "", "message": "invalid request"}
        return error_response(
            status=422,
            code="validation_error",
            detail=f"{first['field']}: {first['message']}" if first["field"] else first["message"],
            instance=request.url.path,
            extra={"errors": errors},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return error_response(
            status=exc.status_code,
            code=code,
            detail=detail,
            instance=request.url.path,
            headers=headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(
            status=500,
            code="internal_error",
            detail="internal error; the request was not applied",
            instance=request.url.path,
        )
