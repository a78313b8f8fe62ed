"""Shared engine fixtures: a tiny pipeline folder and a small synthetic captioned dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from workers.engine.model_builder import build_pipeline_folder
from workers.engine.training import TrainItem

# Distinct coloured shapes: easy for a tiny model to start fitting within a few steps.
_SHAPES = [
    ("red", (220, 30, 30), "circle"),
    ("green", (30, 200, 60), "square"),
    ("blue", (40, 60, 230), "triangle"),
    ("yellow", (240, 220, 40), "circle"),
    ("purple", (150, 40, 190), "square"),
    ("orange", (250, 140, 20), "triangle"),
    ("cyan", (30, 210, 220), "circle"),
    ("white", (245, 245, 245), "square"),
]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny SD 1.x pipeline folder, built once per session."""
    return build_pipeline_folder("tiny", tmp_path_factory.mktemp("tiny-pipeline"))


def _draw_shape(colour: tuple[int, int, int], shape: str, size: int) -> Image.Image:
    image = Image.new("RGB", (size + size // 4, size), (20, 20, 20))  # not square: crops matter
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, size - size // 4 + size // 8, size - size // 4)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(
            [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour
        )
    return image


@pytest.fixture(scope="session")
def shape_items(tmp_path_factory: pytest.TempPathFactory) -> list[TrainItem]:
    """Eight PNGs of distinct coloured shapes, each with two captions."""
    folder = tmp_path_factory.mktemp("shapes")
    items = []
    for index, (name, colour, shape) in enumerate(_SHAPES):
        path = folder / f"{index:02d}-{name}-{shape}.png"
        _draw_shape(colour, shape, 80).save(path)
        items.append(TrainItem(path, (f"a {name} {shape}", f"{shape}, {name}, dark background")))
    return items
