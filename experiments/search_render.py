"""Pictures of dual-path-search's results (experiments/search.py): contact sheets of query
results (HTML with the images inline, or PNG) and the bar chart of a caption's word importance
(`dual_path.search.word_importance`). Images are drawn SHEET_THUMBNAIL pixels square at most.
"""
import base64
import html
import io
import os
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dual_path import search

SHEET_THUMBNAIL = 128
_MARGIN = 12
_FONT_SIZE = 14
_LINE_HEIGHT = 18
_TEXT_COLOUR = (20, 20, 20)
_PLACEHOLDER_COLOUR = (225, 225, 225)
_POSITIVE_BAR = (50, 100, 200)
_NEGATIVE_BAR = (200, 70, 50)


class SheetRow(NamedTuple):
    """One row of a contact sheet: an encoded image (or None: no image, or unreadable) and
    lines of text beside it."""

    image: bytes | None
    lines: list[str]


def write_contact_sheet(path: str, title: str, rows: Sequence[SheetRow]) -> None:
    """HTML (path ends in .html/.htm) or PNG (.png) contact sheet of query results."""
    extension = os.path.splitext(path)[1].lower()
    if extension in (".html", ".htm"):
        write_html_sheet(path, title, rows)
    elif extension == ".png":
        write_png_sheet(path, title, rows)
    else:
        raise ValueError(f"{path}: a contact sheet is .html or .png, not {extension or 'nothing'}")


def write_html_sheet(path: str, title: str, rows: Sequence[SheetRow]) -> None:
    """A standalone HTML page: one table row per SheetRow, images inline as base64."""
    cells = []
    for row in rows:
        if row.image is None:
            image_cell = "<td></td>"
        else:
            encoded = base64.b64encode(row.image).decode("ascii")
            size = f"width:{SHEET_THUMBNAIL}px;height:{SHEET_THUMBNAIL}px"
            image_cell = (f'<td><img src="data:{_image_mime_type(row.image)};base64,{encoded}" '
                          f'style="{size};object-fit:contain"></td>')
        lines = "<br>".join(html.escape(line) for line in row.lines)
        cells.append(f"<tr>{image_cell}<td>{lines}</td></tr>")
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n<body style=\"font-family:sans-serif\">"
            f"<h2>{html.escape(title)}</h2>\n<table cellpadding=\"6\">\n" + "\n".join(cells)
            + "\n</table></body></html>\n")
    with open(path, "w", encoding="utf-8") as output:
        output.write(page)


def write_png_sheet(path: str, title: str, rows: Sequence[SheetRow]) -> None:
    """A PNG: the title, then one line per SheetRow, its thumbnail left of its text."""
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max([measure.textlength(title, font=font)]
                     + [measure.textlength(line, font=font) for row in rows for line in row.lines])
    has_images = any(row.image is not None for row in rows)
    image_column = SHEET_THUMBNAIL + _MARGIN if has_images else 0
    heights = [max(SHEET_THUMBNAIL if row.image is not None else 0, _LINE_HEIGHT * len(row.lines))
               for row in rows]
    width = int(2 * _MARGIN + image_column + text_width)
    height = 2 * _MARGIN + _LINE_HEIGHT + sum(height + _MARGIN for height in heights)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((_MARGIN, _MARGIN), title, fill=_TEXT_COLOUR, font=font)
    top = 2 * _MARGIN + _LINE_HEIGHT
    for row, row_height in zip(rows, heights):
        if row.image is not None:
            sheet.paste(_thumbnail(row.image), (_MARGIN, top))
        for number, line in enumerate(row.lines):
            draw.text((_MARGIN + image_column, top + number * _LINE_HEIGHT), line,
                      fill=_TEXT_COLOUR, font=font)
        top += row_height + _MARGIN
    sheet.save(path, format="PNG")


def draw_word_importance(path: str, importance: search.WordImportance, title: str,
                         image_bytes: bytes | None = None) -> None:
    """A PNG bar chart of the drops: one row per word, bars right of the zero line for
    positive drops (blue) and left of it for negative ones (red), the value beside each;
    the image's thumbnail above when given."""
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = int(max(measure.textlength(word, font=font) for word in importance.words))
    bar_area = 360
    value_width = int(measure.textlength("-0.000", font=font)) + _MARGIN
    scale = (bar_area / 2) / max(float(np.abs(importance.drops).max()), 1e-6)
    picture_height = SHEET_THUMBNAIL + _MARGIN if image_bytes is not None else 0
    width = max(2 * _MARGIN + label_width + _MARGIN + bar_area + value_width,
                int(measure.textlength(title, font=font)) + 2 * _MARGIN)
    top = 2 * _MARGIN + _LINE_HEIGHT + picture_height
    height = top + _LINE_HEIGHT * len(importance.words) + _MARGIN
    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    draw.text((_MARGIN, _MARGIN), title, fill=_TEXT_COLOUR, font=font)
    if image_bytes is not None:
        chart.paste(_thumbnail(image_bytes), (_MARGIN, 2 * _MARGIN + _LINE_HEIGHT))
    zero = _MARGIN + label_width + _MARGIN + bar_area // 2
    for number, (word, drop) in enumerate(zip(importance.words, importance.drops)):
        y = top + number * _LINE_HEIGHT
        draw.text((_MARGIN + label_width - measure.textlength(word, font=font), y), word,
                  fill=_TEXT_COLOUR, font=font)
        end = zero + int(round(float(drop) * scale))
        draw.rectangle((min(zero, end), y + 3, max(zero, end), y + _LINE_HEIGHT - 3),
                       fill=_POSITIVE_BAR if drop >= 0 else _NEGATIVE_BAR)
        draw.text((zero + bar_area // 2 + _MARGIN // 2, y), f"{drop:+.3f}", fill=_TEXT_COLOUR,
                  font=font)
    draw.line((zero, top, zero, height - _MARGIN), fill=_TEXT_COLOUR)
    chart.save(path, format="PNG")


def _image_mime_type(data: bytes) -> str:
    return "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=_FONT_SIZE)


def _thumbnail(data: bytes | None) -> Image.Image:
    """The encoded image scaled (up or down) to fit a SHEET_THUMBNAIL square, RGB; a grey
    square if it cannot be decoded."""
    try:
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        scale = SHEET_THUMBNAIL / max(picture.size)
        return picture.resize((max(1, round(picture.width * scale)),
                               max(1, round(picture.height * scale))), Image.Resampling.LANCZOS)
    except (OSError, ValueError, TypeError):
        return Image.new("RGB", (SHEET_THUMBNAIL, SHEET_THUMBNAIL), _PLACEHOLDER_COLOUR)
