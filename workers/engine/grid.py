"""Labeled image grids (A1111's X/Y plot): equal-sized cells in rows and columns, with each
row's label in a left margin and each column's label in a top margin. Pillow only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

_PAD = 4
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_MAX_LABEL_CHARS = 60
_ROW_LABEL_WIDTH = 160  # pixels; longer row labels wrap


@dataclass(frozen=True)
class GridLayout:
    """Where the cells are: cell (row r, column c) starts at
    (origin_x + c * cell_width, origin_y + r * cell_height)."""

    rows: int
    columns: int
    cell_width: int
    cell_height: int
    origin_x: int
    origin_y: int

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        left = self.origin_x + column * self.cell_width
        top = self.origin_y + row * self.cell_height
        return (left, top, left + self.cell_width, top + self.cell_height)

    def to_json(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "columns": self.columns,
            "cell_width": self.cell_width,
            "cell_height": self.cell_height,
            "origin_x": self.origin_x,
            "origin_y": self.origin_y,
        }


def compose_grid(
    cells: Sequence[Sequence[Image.Image | None]],
    *,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
) -> tuple[Image.Image, GridLayout]:
    """One RGB image of ``cells[row][column]`` (None leaves a blank cell) with the labels.

    Cells are pasted at the size of the largest one (smaller ones top-left, unscaled), so a
    cell's pixels are exactly the image's.
    """
    if not cells or not cells[0]:
        raise ValueError("a grid needs at least one row and one column")
    if len(row_labels) != len(cells) or any(len(row) != len(column_labels) for row in cells):
        raise ValueError("one label per row and per column")
    font = ImageFont.load_default()
    pictures = [c for row in cells for c in row if c is not None]
    cell_width = max((p.width for p in pictures), default=64)
    cell_height = max((p.height for p in pictures), default=64)
    rows = [_clip(label) for label in row_labels]
    columns = [_clip(label) for label in column_labels]
    line_height = _text_height(font)
    column_lines = [_wrap(label, font, cell_width - 2 * _PAD) for label in columns]
    origin_y = 2 * _PAD + line_height * max(len(lines) for lines in column_lines)
    row_lines = [_wrap(label, font, _ROW_LABEL_WIDTH) for label in rows]
    origin_x = 2 * _PAD + max(int(font.getlength(line)) for lines in row_lines for line in lines)
    layout = GridLayout(
        rows=len(cells),
        columns=len(columns),
        cell_width=cell_width,
        cell_height=cell_height,
        origin_x=origin_x,
        origin_y=origin_y,
    )
    canvas = Image.new(
        "RGB",
        (origin_x + cell_width * len(columns), origin_y + cell_height * len(cells)),
        _BACKGROUND,
    )
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(column_lines):
        left = origin_x + c * cell_width + _PAD
        for index, line in enumerate(lines):
            draw.text((left, _PAD + index * line_height), line, fill=_INK, font=font)
    for r, row in enumerate(cells):
        top = origin_y + r * cell_height
        for index, line in enumerate(row_lines[r]):
            draw.text((_PAD, top + _PAD + index * line_height), line, fill=_INK, font=font)
        for c, picture in enumerate(row):
            if picture is not None:
                canvas.paste(picture.convert("RGB"), layout.box(r, c)[:2])
    return canvas, layout


def _clip(label: str) -> str:
    label = " ".join(label.split())
    return label if len(label) <= _MAX_LABEL_CHARS else label[: _MAX_LABEL_CHARS - 1] + "…"


def _text_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    return int(font.getbbox("Ag")[3]) + 2


def _wrap(label: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than the width gets its own line)."""
    lines: list[str] = []
    current = ""
    for word in label.split(" "):
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines
