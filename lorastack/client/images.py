"""Generated images: PNG bytes with their metadata, saved to disk or opened with Pillow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorastack.client.models import Generation, ImageInfo


@dataclass(frozen=True)
class Image:
    """One generated image: its PNG bytes and the server's record of it."""

    info: ImageInfo
    data: bytes

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def seed(self) -> int | None:
        return self.info.seed

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the PNG to ``path``; returns the path."""
        target = Path(path)
        target.write_bytes(self.data)
        return target

    def to_pil(self) -> Any:
        """A ``PIL.Image.Image`` (needs Pillow installed)."""
        import io

        from PIL import Image as PILImage

        picture = PILImage.open(io.BytesIO(self.data))
        picture.load()
        return picture

    def _repr_png_(self) -> bytes:  # shown inline by Jupyter
        return self.data


@dataclass(frozen=True)
class GenerationResult:
    """The answer to ``generate``: the images, in order, and the generation's metadata."""

    generation: Generation
    images: list[Image]

    @property
    def job_id(self) -> str:
        return self.generation.job_id

    def __iter__(self) -> Iterator[Image]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image:
        return self.images[index]
