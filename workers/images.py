"""Images a job makes outside generation's batch path (validation samples, evaluation images,
grids): the PNG in the artifact store and its `image` row, served at `GET /images/{id}`."""

from __future__ import annotations

import io
from typing import Any

from sqlalchemy.orm import Session

from service.models import Image
from service.storage import ArtifactStore


def store_png(
    session: Session,
    store: ArtifactStore,
    *,
    tenant_id: str,
    job_id: str,
    picture: Any,
    seed: int | None,
) -> str:
    """Write ``picture`` (a PIL image) as a PNG and add its row; the new image's id."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    stored = store.put_bytes(buffer.getvalue(), prefix="images", suffix=".png")
    row = Image(
        tenant_id=tenant_id,
        job_id=job_id,
        storage_key=stored.key,
        seed=seed,
        width=picture.width,
        height=picture.height,
    )
    session.add(row)
    session.flush()
    return row.id
