"""HTTP routes for the adapter registry: list, read, download, import, aliases, deletes, and
promoting a training checkpoint to a version."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse

from lorafile import AdapterErrorCode, AdapterLintError
from service import publishing
from service.adapters import aliases, downloads, imports, promotion, refs, views
from service.adapters.schemas import (
    AdapterList,
    AdapterOut,
    AdapterVersionOut,
    AliasOut,
    AliasPut,
    DownloadFormat,
    ImportedVersionOut,
    LintReportOut,
    PromotedVersionOut,
)
from service.deps import AppSettings, Caller, Paging, Store, UoW
from service.errors import PayloadTooLarge, ServiceError, Unprocessable, UnsupportedMediaType
from service.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader, IdempotentRequest
from service.problems import COMMON_ERRORS, problem_responses
from service.storage import ArtifactStore
from service.strict_input import SQL_INT_MAX, StrictInputRoute

# Every adapter route but the list and the import names an adapter (404) or changes one (409).
router = APIRouter(
    tags=["adapters"],
    route_class=StrictInputRoute,
    responses=problem_responses(*COMMON_ERRORS, 404, 409),
)

AdapterName = Annotated[str, Path(max_length=100, description="the adapter's name")]
VersionSelector = Annotated[
    str, Path(max_length=100, description="a version number (3) or an alias (prod, latest)")
]
AliasName = Annotated[str, Path(max_length=100, description="lowercase a-z 0-9 . _ -")]
IMPORT_SCOPE = "POST /adapters/import"
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
# More digits than this is more bytes than any file has (and int() refuses 4,300 digits).
_RANGE_DIGITS = 18


@router.get("/adapters", operation_id="list_adapters", response_model=AdapterList)
def list_adapters_route(
    uow: UoW,
    caller: Caller,
    page: Paging,
    base_model: Annotated[str | None, Query(max_length=200)] = None,
    prefix: Annotated[str | None, Query(max_length=100, description="name prefix")] = None,
) -> AdapterList:
    rows, has_more = views.list_adapters(
        uow.session,
        tenant_id=caller.tenant_id,
        limit=page.limit,
        after=page.after,
        base_model=base_model,
        prefix=prefix,
    )
    return AdapterList(data=rows, has_more=has_more)


@router.get("/adapters/{name}", operation_id="get_adapter", response_model=AdapterOut)
def get_adapter_route(name: AdapterName, uow: UoW, caller: Caller) -> AdapterOut:
    """One adapter: its versions, aliases and alias history (newest first)."""
    adapter = refs.get_adapter(uow.session, tenant_id=caller.tenant_id, name=name)
    return views.adapter_view(uow.session, adapter)


@router.delete("/adapters/{name}", operation_id="delete_adapter", status_code=204)
def delete_adapter_route(name: AdapterName, uow: UoW, caller: Caller, store: Store) -> Response:
    """Delete an adapter with its versions and aliases (409 while a job trains into it)."""
    adapter = refs.get_adapter(uow.session, tenant_id=caller.tenant_id, name=name)
    keys = aliases.delete_adapter(uow.session, adapter=adapter)
    uow.commit()
    publishing.discard_unreferenced(uow.session, store, keys)
    return Response(status_code=204)


@router.get(
    "/adapters/{name}/versions/{version}",
    operation_id="get_adapter_version",
    response_model=AdapterVersionOut,
)
def get_version_route(
    name: AdapterName, version: VersionSelector, uow: UoW, caller: Caller
) -> AdapterVersionOut:
    """Version metadata and lineage; ``version`` is a number or an alias."""
    adapter = refs.get_adapter(uow.session, tenant_id=caller.tenant_id, name=name)
    row = refs.resolve_version(uow.session, adapter=adapter, selector=version)
    return views.version_view(uow.session, adapter, row)


@router.delete(
    "/adapters/{name}/versions/{version}", operation_id="delete_adapter_version", status_code=204
)
def delete_version_route(
    name: AdapterName,
    version: VersionSelector,
    uow: UoW,
    caller: Caller,
    store: Store,
    force: Annotated[
        bool, Query(description="also remove the aliases (other than latest) pointing at it")
    ] = False,
) -> Response:
    """Delete a version; ``latest`` moves back to the newest remaining one."""
    adapter = refs.get_adapter(uow.session, tenant_id=caller.tenant_id, name=name)
    row = refs.resolve_version(uow.session, adapter=adapter, selector=version)
    key = aliases.delete_version(
        uow.session, adapter=adapter, version=row, force=force, actor=caller.key_id
    )
    uow.commit()
    publishing.discard_unreferenced(uow.session, store, [key])
    return Response(status_code=204)


def _etag_matches(header: str, etag: str) -> bool:
    candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
    return "*" in candidates or etag in candidates


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one range ``bytes=a-b`` / ``a-`` / ``-n`` asks for; None to serve the whole file.

    Malformed and multi-range headers are ignored, as RFC 9110 allows.
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None or match[1] == match[2] == "":
        return None
    first, last = _position(match[1]), _position(match[2])
    if first is None:
        assert last is not None
        if last == 0:
            raise _unsatisfiable(size)
        return max(0, size - last), size - 1
    if last is not None and last < first:
        return None  # invalid range: ignored
    if first >= size:
        raise _unsatisfiable(size)
    return first, size - 1 if last is None else min(last, size - 1)


def _position(digits: str) -> int | None:
    """A byte position from a Range header; a number too long to be a file offset is capped."""
    if not digits:
        return None
    return int(digits) if len(digits) <= _RANGE_DIGITS else 10**_RANGE_DIGITS


def _unsatisfiable(size: int) -> ServiceError:
    return ServiceError(
        f"the range is outside the file's {size} bytes",
        status=416,
        code="range_not_satisfiable",
        headers={"Content-Range": f"bytes */{size}"},
    )


@router.get(
    "/adapters/{name}/versions/{version}/download",
    operation_id="download_adapter_version",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the safetensors file"},
        206: {"content": {"application/octet-stream": {}}, "description": "the range asked for"},
        304: {"description": "If-None-Match matched the ETag"},
        **problem_responses(416),
    },
)
def download_version_route(
    request: Request,
    name: AdapterName,
    version: VersionSelector,
    uow: UoW,
    caller: Caller,
    store: Store,
    fmt: Annotated[
        DownloadFormat, Query(alias="format", description="diffusers (default) or kohya")
    ] = "diffusers",
) -> Response:
    """The version as a safetensors file with lorastack metadata in its header.

    ``ETag`` is the sha256 of the bytes served; ``If-None-Match`` and ``Range`` work.
    """
    adapter = refs.get_adapter(uow.session, tenant_id=caller.tenant_id, name=name)
    row = refs.resolve_version(uow.session, adapter=adapter, selector=version)
    served = downloads.download_file(store, adapter=adapter, version=row, fmt=fmt)
    etag = f'"{served.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        # A URL with an alias can name other bytes later: cache, but revalidate.
        "Cache-Control": "private, no-cache",
        "Content-Disposition": f'attachment; filename="{served.filename}"',
    }
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    if_range = request.headers.get("if-range")
    wanted = request.headers.get("range") if if_range in (None, etag) else None
    span = _byte_range(wanted, served.size)
    status = 200
    start, end = 0, served.size - 1
    if span is not None:
        status = 206
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{served.size}"
    headers["Content-Length"] = str(end - start + 1)
    body = store.iter_bytes(served.key, start=start, end=end) if served.size else iter(())
    return StreamingResponse(
        body, status_code=status, media_type="application/octet-stream", headers=headers
    )


@router.post(
    "/adapters/import",
    operation_id="import_adapter",
    status_code=201,
    response_model=ImportedVersionOut,
    responses=problem_responses(415, 429),
)
def import_adapter_route(
    response: Response,
    uow: UoW,
    caller: Caller,
    settings: AppSettings,
    store: Store,
    file: Annotated[UploadFile, File(description="a LoRA .safetensors file (any known format)")],
    name: Annotated[str, Form(max_length=100, description="adapter name")],
    base_model: Annotated[str, Form(max_length=200, description="a configured base model")],
    idempotency_key: IdempotencyKeyHeader = None,
) -> ImportedVersionOut:
    """Lint a LoRA file against the base model, convert it to the canonical diffusers form and
    publish it as the adapter's next version. The lint report comes back either way."""
    try:
        data = imports.read_upload(file.file, max_bytes=imports.import_upload_cap(settings))
        keyed = IdempotentRequest.of(
            tenant_id=caller.tenant_id,
            scope=IMPORT_SCOPE,
            key=idempotency_key,
            payload={
                "name": name,
                "base_model": base_model,
                "sha256": hashlib.sha256(data).hexdigest(),
            },
        )
        first = keyed.find(uow.session) if keyed is not None else None
        if first is not None:
            response.headers[REPLAYED_HEADER] = "true"
            return _imported_view(uow, caller.tenant_id, first)
        imported = imports.import_adapter(
            uow.session,
            store=store,
            settings=settings,
            tenant_id=caller.tenant_id,
            name=name,
            base_model=base_model,
            data=data,
            filename=file.filename,
            actor=caller.key_id,
        )
    except AdapterLintError as exc:
        raise lint_problem(exc) from None
    return _commit_import(uow, store, response, keyed=keyed, imported=imported)


def _commit_import(
    uow: UoW,
    store: ArtifactStore,
    response: Response,
    *,
    keyed: IdempotentRequest | None,
    imported: imports.ImportedVersion,
) -> ImportedVersionOut:
    """Commit the imported version (or answer the concurrent first request with the same key);
    a file this request added goes again when the commit fails."""
    new_keys = [imported.file.stored.key] if imported.file.created else []
    try:
        if keyed is not None:
            winner = keyed.remember(uow.session, resource_id=imported.version.id)
            if winner != imported.version.id:
                # A concurrent request with the same key committed first; ours is rolled back.
                publishing.discard_unreferenced(uow.session, store, new_keys)
                response.headers[REPLAYED_HEADER] = "true"
                return _imported_view(uow, imported.version.tenant_id, winner)
        view = ImportedVersionOut(
            **views.version_view(uow.session, imported.adapter, imported.version).model_dump(),
            report=views.stored_report(imported.version),
        )
        uow.commit()
    except BaseException:
        uow.session.rollback()
        publishing.discard_unreferenced(uow.session, store, new_keys)
        raise
    return view


def lint_problem(error: AdapterLintError) -> ServiceError:
    """The problem+json for a refused adapter file, with the lint report under ``report``."""
    extra = {"report": LintReportOut(**error.report.to_dict()).model_dump(mode="json")}
    status_class: type[ServiceError] = Unprocessable
    if error.code == AdapterErrorCode.TOO_LARGE:
        status_class = PayloadTooLarge
    elif error.code == AdapterErrorCode.NOT_SAFETENSORS:
        status_class = UnsupportedMediaType
    return status_class(f"file: {error.message}", code=str(error.code), extra=extra)


def _imported_view(uow: UoW, tenant_id: str, version_id: str) -> ImportedVersionOut:
    version = refs.get_version_by_id(uow.session, tenant_id=tenant_id, version_id=version_id)
    adapter = refs.adapter_of(uow.session, version)
    return ImportedVersionOut(
        **views.version_view(uow.session, adapter, version).model_dump(),
        report=views.stored_report(version),
    )


@router.put(
    "/adapters/{name}/aliases/{alias}", operation_id="put_adapter_alias", response_model=AliasOut
)
def put_alias_route(
    name: AdapterName, alias: AliasName, body: AliasPut, uow: UoW, caller: Caller
) -> AliasOut:
    """Point an alias at a version (created or moved; the move is kept in the history)."""
    adapter = refs.get_adapter(uow.session, tenant_id=caller.tenant_id, name=name)
    row = aliases.set_alias(
        uow.session, adapter=adapter, alias=alias, version=body.version, actor=caller.key_id
    )
    out = AliasOut.from_row(adapter, row)
    uow.commit()
    return out


@router.delete(
    "/adapters/{name}/aliases/{alias}", operation_id="delete_adapter_alias", status_code=204
)
def delete_alias_route(name: AdapterName, alias: AliasName, uow: UoW, caller: Caller) -> Response:
    adapter = refs.get_adapter(uow.session, tenant_id=caller.tenant_id, name=name)
    aliases.delete_alias(uow.session, adapter=adapter, alias=alias, actor=caller.key_id)
    uow.commit()
    return Response(status_code=204)


@router.post(
    "/jobs/{job_id}/checkpoints/{step}/promote",
    operation_id="promote_checkpoint",
    status_code=201,
    response_model=PromotedVersionOut,
    responses={200: {"model": PromotedVersionOut, "description": "promoted before"}},
    tags=["jobs"],
)
def promote_checkpoint_route(
    job_id: str,
    step: Annotated[int, Path(ge=0, le=SQL_INT_MAX)],
    response: Response,
    uow: UoW,
    caller: Caller,
    settings: AppSettings,
    store: Store,
) -> PromotedVersionOut:
    """Publish a training checkpoint as the job's adapter's next version (source checkpoint).

    Promoting the same checkpoint again answers 200 with the version made the first time.
    """
    promoted = promotion.promote_checkpoint(
        uow.session,
        store=store,
        settings=settings,
        tenant_id=caller.tenant_id,
        job_id=job_id,
        step=step,
        actor=caller.key_id,
    )
    new_keys = (
        [promoted.file.stored.key] if promoted.file is not None and promoted.file.created else []
    )
    try:
        view = PromotedVersionOut(
            **views.version_view(uow.session, promoted.adapter, promoted.version).model_dump(),
            created=promoted.created,
        )
        uow.commit()
    except BaseException:
        uow.session.rollback()
        publishing.discard_unreferenced(uow.session, store, new_keys)
        raise
    if not promoted.created:
        response.status_code = 200
    return view
