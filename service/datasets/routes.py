"""HTTP routes for datasets: upload a zip, list, read (with the report), thumbnails, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.datasets.images import THUMBNAIL_MEDIA_TYPE
from service.datasets.schemas import DatasetList, DatasetOut, DatasetSummary
from service.datasets.service import (
    DatasetCreation,
    NewDataset,
    create_dataset,
    dataset_thumbnail,
    delete_dataset,
    get_dataset,
    list_datasets,
    spooled_upload,
)
from service.deps import AppSettings, Caller, Paging, Store, UoW
from service.errors import UnsupportedMediaType
from service.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader
from service.problems import COMMON_ERRORS, problem_responses
from service.strict_input import StrictInputRoute

router = APIRouter(
    tags=["datasets"], route_class=StrictInputRoute, responses=problem_responses(*COMMON_ERRORS)
)

# Stored images never change, so a thumbnail can be cached (privately: it is tenant data).
_THUMBNAIL_CACHE_CONTROL = "private, max-age=86400, immutable"


def require_multipart(request: Request) -> None:
    """415 for a body that is not multipart/form-data (before field validation says 422)."""
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            "send the dataset as multipart/form-data: the zip under `file` and a `name`"
        )


@router.post(
    "/datasets",
    operation_id="create_dataset",
    status_code=201,
    response_model=DatasetOut,
    responses=problem_responses(
        400,
        413,
        415,
        422,
        429,
        descriptions={
            400: "malformed multipart body",
            413: "upload or archive over a cap",
            415: "not multipart, or the file is not a zip",
            422: "unsafe or unusable archive (report attached), or invalid fields",
        },
    ),
)
async def create_dataset_route(
    response: Response,
    uow: UoW,
    caller: Caller,
    store: Store,
    settings: AppSettings,
    _multipart: Annotated[None, Depends(require_multipart)],
    file: Annotated[UploadFile, File(description="a zip of images and captions")],
    name: Annotated[str, Form(min_length=1, max_length=200, pattern=r"\S")],
    caption: Annotated[
        str | None, Form(description="one fixed caption for every image (replaces file captions)")
    ] = None,
    trigger_word: Annotated[
        str | None, Form(description="prepended to every caption as '<trigger>, <caption>'")
    ] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> DatasetOut:
    """Upload a zip; answers the dataset and its preflight report, or a 4xx storing nothing."""
    limits = settings.dataset_caps()
    request = NewDataset(name=name.strip(), caption=caption, trigger_word=trigger_word)

    def create() -> DatasetCreation:
        with spooled_upload(file.file, store=store, limits=limits) as upload:
            return create_dataset(
                uow,
                store=store,
                tenant_id=caller.tenant_id,
                request=request,
                upload=upload,
                limits=limits,
                idempotency_key=idempotency_key,
            )

    created = await run_in_threadpool(create)
    response.headers["Location"] = f"/datasets/{created.dataset.id}"
    if created.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return DatasetOut.from_row(created.dataset)


@router.get("/datasets", operation_id="list_datasets", response_model=DatasetList)
def list_datasets_route(uow: UoW, caller: Caller, page: Paging) -> DatasetList:
    rows, has_more = list_datasets(
        uow.session, tenant_id=caller.tenant_id, limit=page.limit, after=page.after
    )
    return DatasetList(data=[DatasetSummary.from_row(d) for d in rows], has_more=has_more)


@router.get(
    "/datasets/{dataset_id}",
    operation_id="get_dataset",
    response_model=DatasetOut,
    responses=problem_responses(404),
)
def get_dataset_route(dataset_id: str, uow: UoW, caller: Caller) -> DatasetOut:
    dataset = get_dataset(uow.session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    return DatasetOut.from_row(dataset)


@router.get(
    "/datasets/{dataset_id}/images/{index}",
    operation_id="get_dataset_image",
    response_class=Response,
    responses={200: {"content": {THUMBNAIL_MEDIA_TYPE: {}}}, **problem_responses(404)},
)
def get_dataset_image_route(
    dataset_id: str,
    index: Annotated[int, Path(ge=0, description="the item's index in manifest.json")],
    uow: UoW,
    caller: Caller,
    store: Store,
    size: Annotated[int, Query(ge=16, le=1024, description="longest side, in pixels")] = 256,
) -> Response:
    """A JPEG thumbnail of one stored image."""
    dataset = get_dataset(uow.session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    thumbnail = dataset_thumbnail(store, dataset, index=index, max_side=size)
    return Response(
        thumbnail,
        media_type=THUMBNAIL_MEDIA_TYPE,
        headers={"Cache-Control": _THUMBNAIL_CACHE_CONTROL},
    )


@router.delete(
    "/datasets/{dataset_id}",
    operation_id="delete_dataset",
    status_code=204,
    response_class=Response,
    responses=problem_responses(404, 409, descriptions={409: "an active job uses it"}),
)
def delete_dataset_route(dataset_id: str, uow: UoW, caller: Caller, store: Store) -> Response:
    """Delete a dataset and its files; 409 ``dataset_in_use`` while an active job uses it."""
    dataset = delete_dataset(uow.session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    storage_key = dataset.storage_key
    # Files go only once the deletion is committed, so a failed commit leaves them usable.
    uow.after_commit(lambda: store.delete(storage_key))
    uow.commit()
    return Response(status_code=204)
