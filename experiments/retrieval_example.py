"""Draws a validation's retrieval example for TensorBoard: the query caption over its top-K
images, each framed green where it is the caption's own image, red elsewhere (PIL).

Handed to the trainer as `draw_retrieval_example` (`dual_path.tensorboard_extras`).
"""
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dual_path.tensorboard_extras import RETRIEVAL_EXAMPLE_IMAGE_SIZE

BORDER = 4
"""Width of each image's frame, pixels."""
# PIL's default bitmap font: about 6 pixels a character, 11 a line.
_CHARACTER_WIDTH = 6
_LINE_HEIGHT = 14
_CAPTION_LINES = 3


def draw_retrieval_example(query: str, images: Sequence[np.ndarray],
                           correct: Sequence[bool]) -> np.ndarray:
    """uint8 [H, W, 3]: the query (up to 3 wrapped lines) over its top-K images (uint8
    [S, S, 3], shown at RETRIEVAL_EXAMPLE_IMAGE_SIZE), green frame = its own image."""
    size = RETRIEVAL_EXAMPLE_IMAGE_SIZE
    tile = size + 2 * BORDER
    lines = textwrap.wrap(query, width=max(20, tile * len(images) // _CHARACTER_WIDTH),
                          max_lines=_CAPTION_LINES, placeholder="...")
    strip = _LINE_HEIGHT * len(lines) + 8
    canvas = Image.new("RGB", (tile * len(images), tile + strip), "white")
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((4, 4), "\n".join(lines), fill="black", spacing=_LINE_HEIGHT - 11)
    for position, (image, is_correct) in enumerate(zip(images, correct)):
        left, top = position * tile, strip
        draw.rectangle([left, top, left + tile - 1, top + tile - 1],
                       fill=(30, 170, 60) if is_correct else (200, 40, 40))
        canvas.paste(Image.fromarray(image).resize((size, size)), (left + BORDER, top + BORDER))
    return np.asarray(canvas)
