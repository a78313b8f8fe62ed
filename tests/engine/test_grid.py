"""Labeled grids: every cell holds its image's exact pixels, and every label is drawn."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from workers.engine.grid import compose_grid


def _tile(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), colour)
    image.putpixel((3, 5), (1, 2, 3))  # not uniform, so a misplaced paste shows
    return image


def test_cells_and_labels() -> None:
    colours = [[(200, 0, 0), (0, 200, 0), (0, 0, 200)], [(90, 90, 0), (0, 90, 90), (90, 0, 90)]]
    cells = [[_tile(c) for c in row] for row in colours]
    grid, layout = compose_grid(
        cells,
        row_labels=["a red circle", "(control) a long prompt " * 4],
        column_labels=["base", "step 2", "a very long column label that wraps"],
    )
    assert (layout.rows, layout.columns) == (2, 3)
    assert grid.size == (layout.origin_x + 3 * 32, layout.origin_y + 2 * 32)
    pixels = np.asarray(grid)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            left, top, right, bottom = layout.box(r, c)
            assert np.array_equal(pixels[top:bottom, left:right], np.asarray(cell))
    # Each label strip has ink: one per column above the cells, one per row left of them.
    for c in range(3):
        left, _, right, _ = layout.box(0, c)
        assert (pixels[: layout.origin_y, left:right] < 128).any()
    for r in range(2):
        _, top, _, bottom = layout.box(r, 0)
        assert (pixels[top:bottom, : layout.origin_x] < 128).any()
    # The wrapped column label takes more than one line.
    single, single_layout = compose_grid([[cells[0][0]]], row_labels=["x"], column_labels=["x"])
    assert layout.origin_y > single_layout.origin_y and single.size[1] < grid.size[1]


def test_blank_cells_and_refusals() -> None:
    grid, layout = compose_grid(
        [[_tile((9, 9, 9)), None]], row_labels=["p"], column_labels=["a", "b"]
    )
    left, top, right, bottom = layout.box(0, 1)
    assert (np.asarray(grid)[top:bottom, left:right] == 255).all()
    with pytest.raises(ValueError, match="one label"):
        compose_grid([[_tile((0, 0, 0))]], row_labels=[], column_labels=["a"])
    with pytest.raises(ValueError, match="at least one"):
        compose_grid([], row_labels=[], column_labels=[])
