"""The embedded dataset: a deterministic, instance-level, fine-grained image-caption set.

Each image shows 1-4 objects over a noisy background. An object is a colour (8),
a shape (4) and a size (2) in one cell of a 3x3 grid, so telling images apart takes
what class-level features lose: count, colour, size and position. Many images are
one-attribute mutations of another image of their split (a colour, size, shape or
position changed, an object added or removed), so near-duplicates are common.

Every image gets 5 captions from varied templates (synonyms, word orders, grid
positions, relations such as "to the left of", counts such as "two red circles"):
two give the full description, the others leave a detail out as human captions do.
No two val images and no two test images share a full description (`describe`);
train may repeat. Positions are only worded with "left" and "right" (which a
horizontal flip swaps) and with words a horizontal flip leaves true.

`generate` writes what a real dataset ships: `<output_dir>/images/<imgid>.jpg` and a
Karpathy-style `<output_dir>/dataset_synthetic.json` (the schema of
dataset_flickr30k.json, read by the same reader as real data). Same seed, same bytes.
"""
import collections
import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from data_prep import records
from dual_path import text

DATASET_NAME = "synthetic"
JSON_NAME = f"dataset_{DATASET_NAME}.json"
IMAGE_DIR = "images"
CAPTIONS_PER_IMAGE = 5
SPLITS = ("train", "val", "test")
UNIQUE_SPLITS = ("val", "test")
IMAGE_SHARDS = 4
CAPTION_SHARDS = 2
"""Shard counts of the generated dataset's shards (8,000 train images), as dual-path-demo and
experiments/run_experiments build them."""
MIN_IMAGE_SIZE = 32  # below it a large object no longer fits in its cell

# Object colours, RGB uint8; plain and far from the greyish background.
COLOURS = {
    "red": (215, 30, 30),
    "green": (40, 170, 50),
    "blue": (35, 75, 225),
    "yellow": (240, 220, 30),
    "orange": (245, 135, 20),
    "purple": (140, 45, 185),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Object extent as a fraction of the image side.
SIZES = {"small": 0.14, "large": 0.27}
GRID = 3
MAX_OBJECTS = 4
OBJECT_COUNT_PROBABILITIES = (0.15, 0.3, 0.3, 0.25)  # of 1, 2, 3, 4 objects
# Chance that an object repeats the colour and shape of an earlier one ("two red circles").
REPEAT_PROBABILITY = 0.3
# Chance that an image is a one-attribute mutation of an earlier image of its split.
MUTATION_PROBABILITY = 0.3
MAX_TRIES_PER_SCENE = 1000

# Caption wording. The first word of each tuple is the canonical one (`describe`).
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {  # (singular, plural) pairs
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
}
ROW_WORDS = (("top", "upper"), ("middle", "center"), ("bottom", "lower"))
COLUMN_WORDS = (("left",), ("center", "middle"), ("right",))
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SHAPE_NOUNS = ("shapes", "objects")


@dataclasses.dataclass(frozen=True, order=True)
class SceneObject:
    """One object: grid cell (row 0 = top, column 0 = left), colour, shape and size names."""

    row: int
    column: int
    colour: str
    shape: str
    size: str


# A scene: its objects in reading order (by row, then column), at most one per cell.
Scene = tuple[SceneObject, ...]


def _scene(objects) -> Scene:
    return tuple(sorted(objects))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene of 1-4 objects in distinct cells."""
    count = 1 + int(rng.choice(MAX_OBJECTS, p=OBJECT_COUNT_PROBABILITIES))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    objects = []
    for cell in cells:
        if objects and rng.random() < REPEAT_PROBABILITY:
            model = _pick(rng, objects)
            colour, shape = model.colour, model.shape
        else:
            colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
        row, column = divmod(int(cell), GRID)
        objects.append(SceneObject(row, column, colour, shape, _pick(rng, list(SIZES))))
    return _scene(objects)


def mutate(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one attribute changed: an object's colour, shape, size or cell,
    or one object added or removed."""
    kinds = ["colour", "shape", "size", "move"]
    if len(scene) < MAX_OBJECTS:
        kinds.append("add")
    if len(scene) > 1:
        kinds.append("remove")
    kind = _pick(rng, kinds)
    index = int(rng.integers(len(scene)))
    objects = list(scene)
    target = objects[index]
    free_cells = [
        divmod(cell, GRID)
        for cell in range(GRID * GRID)
        if divmod(cell, GRID) not in {(o.row, o.column) for o in scene}
    ]
    if kind == "colour":
        colour = _pick(rng, [c for c in COLOURS if c != target.colour])
        objects[index] = dataclasses.replace(target, colour=colour)
    elif kind == "shape":
        shape = _pick(rng, [s for s in SHAPES if s != target.shape])
        objects[index] = dataclasses.replace(target, shape=shape)
    elif kind == "size":
        size = _pick(rng, [s for s in SIZES if s != target.size])
        objects[index] = dataclasses.replace(target, size=size)
    elif kind == "move":
        row, column = _pick(rng, free_cells)
        objects[index] = dataclasses.replace(target, row=row, column=column)
    elif kind == "add":
        row, column = _pick(rng, free_cells)
        colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
        objects.append(SceneObject(row, column, colour, shape, _pick(rng, list(SIZES))))
    else:
        del objects[index]
    return _scene(objects)


def make_scenes(count: int, rng: np.random.Generator, unique: bool) -> list[Scene]:
    """`count` scenes of one split; a share of them are mutations of earlier ones.

    unique: no two scenes share a full description (`describe`).
    """
    scenes, seen = [], set()
    for _ in range(count):
        for _ in range(MAX_TRIES_PER_SCENE):
            if scenes and rng.random() < MUTATION_PROBABILITY:
                scene = mutate(_pick(rng, scenes), rng)
            else:
                scene = sample_scene(rng)
            if not unique or describe(scene) not in seen:
                break
        else:
            raise RuntimeError(f"no new unique scene in {MAX_TRIES_PER_SCENE} tries")
        seen.add(describe(scene))
        scenes.append(scene)
    return scenes


# ----------------------------------------------------------------------------- wording


@dataclasses.dataclass
class _Wording:
    """Words chosen for one caption: canonical ones, or synonyms drawn from rng."""

    rng: np.random.Generator | None

    def choose(self, options):
        return options[0] if self.rng is None else _pick(self.rng, options)

    def size(self, size: str) -> str:
        return self.choose(SIZE_WORDS[size])

    def shape(self, shape: str, plural: bool = False) -> str:
        return self.choose(SHAPE_WORDS[shape])[1 if plural else 0]

    def cell(self, obj: SceneObject) -> str:
        """`top left`, `center`, `middle left`, `top center`..."""
        if obj.row == 1 and obj.column == 1:
            return self.choose(("center", "middle"))
        return f"{self.choose(ROW_WORDS[obj.row])} {self.choose(COLUMN_WORDS[obj.column])}"

    def position(self, obj: SceneObject) -> str:
        """`in the top left`, `at the upper left corner`, `in the center`..."""
        preposition = self.choose(("in the", "at the"))
        corner = obj.row != 1 and obj.column != 1 and self.rng is not None and self.rng.random() < 0.3
        return f"{preposition} {self.cell(obj)}{' corner' if corner else ''}"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(obj: SceneObject, wording: _Wording, size=True, colour=True) -> str:
    """`small red circle`; size or colour may be left out."""
    words = [wording.size(obj.size)] if size else []
    words += [obj.colour] if colour else []
    return " ".join(words + [wording.shape(obj.shape)])


def _noun_phrase(obj: SceneObject, wording: _Wording, size=True, colour=True) -> str:
    """`a small red circle`, `an orange cross`."""
    return _with_article(_noun(obj, wording, size, colour))


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(scene: Scene) -> str:
    """The canonical full description: every object's size, colour, shape and cell,
    in reading order, e.g. `a small red circle in the top left, a large blue square in the center`."""
    wording = _Wording(rng=None)
    return ", ".join(f"{_noun_phrase(o, wording)} {wording.position(o)}" for o in scene)


def _ordered(scene: Scene, rng: np.random.Generator) -> list[SceneObject]:
    """The objects in reading order or, half the time, in random order."""
    objects = list(scene)
    if rng.random() < 0.5:
        rng.shuffle(objects)
    return objects


def _list_caption(scene, rng, wording, omit=None, compact=False) -> str:
    """`a small red circle in the top left and a big blue disc in the middle`, or
    compact: `small red circle top left and big blue disc middle`.

    omit: None (full), ("size", None) for no sizes, or ("colour" | "position", object).
    """
    omit_kind, omitted = omit or (None, None)
    phrases = []
    for obj in _ordered(scene, rng):
        phrase = _noun(obj, wording, size=omit_kind != "size",
                       colour=not (omit_kind == "colour" and obj == omitted))
        if not compact:
            phrase = _with_article(phrase)
        if not (omit_kind == "position" and obj == omitted):
            phrase += " " + (wording.cell(obj) if compact else wording.position(obj))
        phrases.append(phrase)
    return _join(phrases)


def _position_first_caption(scene, rng, wording, compact=False) -> str:
    """`in the top left there is a small red circle, and in the center a big blue square`,
    or compact: `top left a small red circle, center a big blue square`."""
    phrases = []
    for obj in _ordered(scene, rng):
        where = wording.cell(obj) if compact else wording.position(obj)
        if not compact and not phrases:
            where += " " + wording.choose(("there is", "we see", "you see"))
        phrases.append(f"{where} {_noun_phrase(obj, wording)}")
    return _join(phrases)


def _count_caption(scene, rng, wording) -> str:
    """`three shapes: two small red circles and a large blue square` (no positions)."""
    if len(scene) == 1:
        return f"{wording.choose(('a single', 'only one', 'just one'))} {_noun(scene[0], wording)}"
    groups = collections.Counter((obj.size, obj.colour, obj.shape) for obj in scene)
    phrases = []
    for (size, colour, shape), count in groups.items():
        noun = f"{wording.size(size)} {colour} {wording.shape(shape, plural=count > 1)}"
        if count > 1:
            phrases.append(f"{NUMBER_WORDS[count]} {noun}")
        else:
            phrases.append(wording.choose((_with_article(noun), f"one {noun}")))
    caption = _join([phrases[i] for i in rng.permutation(len(phrases))])
    if rng.random() < 0.5:
        total = f"{NUMBER_WORDS[len(scene)]} {wording.choose(SHAPE_NOUNS)}"
        caption = f"{wording.choose((total, 'there are ' + total))}: {caption}"
    return caption


def _relation(obj: SceneObject, anchor: SceneObject) -> str:
    """Where obj lies from anchor: `to its left`, `above it`, `below it to the right`."""
    side = "left" if obj.column < anchor.column else "right"
    if obj.row == anchor.row:
        return f"to its {side}"
    vertical = "above it" if obj.row < anchor.row else "below it"
    return vertical if obj.column == anchor.column else f"{vertical} to the {side}"


def _relation_caption(scene, rng, wording) -> str:
    """`a small red circle with a big blue square to its right and a green cross below it`,
    or for two objects `a small red circle to the left of a big blue square`; one object:
    `one small red circle, alone in the top left`."""
    if len(scene) == 1:
        return f"one {_noun(scene[0], wording)}, alone {wording.position(scene[0])}"
    objects = _ordered(scene, rng)
    anchor, others = objects[0], objects[1:]
    if len(scene) == 2 and anchor.row == others[0].row and rng.random() < 0.7:
        other = others[0]
        relation = "to the left of" if anchor.column < other.column else "to the right of"
        relation = wording.choose((relation, relation.removeprefix("to the ")))
        return f"{_noun_phrase(anchor, wording)} {relation} {_noun_phrase(other, wording)}"
    clauses = [f"{_noun_phrase(o, wording)} {_relation(o, anchor)}" for o in others]
    return f"{_noun_phrase(anchor, wording)} with {_join(clauses)}"


def _partial_caption(scene, rng, wording) -> str:
    """The list caption with one detail left out: all sizes, or one object's colour or position."""
    kind = _pick(rng, ("size", "colour", "position"))
    return _list_caption(scene, rng, wording, omit=(kind, None if kind == "size" else _pick(rng, scene)))


def _fits(caption: str) -> bool:
    return len(text.tokenize(caption)) <= records.DEFAULT_MAX_LENGTH


def _first_fitting(candidates) -> str:
    """The first caption of the candidate makers that fits the model's caption length."""
    for make in candidates:
        caption = make()
        if _fits(caption):
            return caption
    raise AssertionError("the last candidate always fits")


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """The 5 raw captions of one scene: full (list), full (position first), counts,
    relations, and one with a detail left out. Each fits in DEFAULT_MAX_LENGTH tokens:
    a sampled wording that does not is replaced by plainer ones."""
    free, plain = _Wording(rng), _Wording(None)

    def fitted(make, *plainer):
        return _first_fitting([lambda: make(scene, rng, free), *plainer])

    made = [
        fitted(_list_caption, lambda: _list_caption(scene, rng, plain),
               lambda: _list_caption(scene, rng, plain, compact=True)),
        fitted(_position_first_caption, lambda: _position_first_caption(scene, rng, plain),
               lambda: _position_first_caption(scene, rng, plain, compact=True)),
        fitted(_count_caption, lambda: _count_caption(scene, rng, plain)),
        fitted(_relation_caption, lambda: _relation_caption(scene, rng, plain),
               lambda: _list_caption(scene, rng, plain, compact=True)),
        fitted(_partial_caption, lambda: _partial_caption(scene, rng, plain),
               lambda: _list_caption(scene, rng, plain, omit=("size", None), compact=True)),
    ]
    return [caption[0].upper() + caption[1:] + "." for caption in made]


# ----------------------------------------------------------------------------- pixels


def _coverage(obj: SceneObject, centre_y: float, centre_x: float, half: float,
              ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Whether each sample point (ys, xs, pixel units) lies in the object: bool, ys' shape."""
    dy, dx = ys - centre_y, xs - centre_x
    if obj.shape == "circle":
        return dy * dy + dx * dx <= half * half
    if obj.shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.85 * half
    if obj.shape == "triangle":  # apex up, base at 0.8 half below the centre
        depth = (dy + half) / 1.8
        return (dy >= -half) & (dy <= 0.8 * half) & (np.abs(dx) <= depth)
    arm = half / 3
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """The scene's pixels: uint8 [image_size, image_size, 3] RGB.

    Greyish background with a random tint and gradient; objects jittered inside their
    cell, antialiased by 2x2 supersampling, colours jittered; per-pixel noise on top.
    """
    grey = (rng.uniform(80, 150) + rng.uniform(-12, 12, size=3)).astype(np.float32)
    axis = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    slope_y, slope_x = rng.uniform(-12, 12, size=2)
    image = grey + (slope_y * axis[:, None] + slope_x * axis[None, :])[..., None]

    cell = image_size / GRID
    for obj in scene:
        half = SIZES[obj.size] * image_size / 2
        slack = max(cell / 2 - half - 1, 0.0)
        centre_y = (obj.row + 0.5) * cell + rng.uniform(-slack, slack)
        centre_x = (obj.column + 0.5) * cell + rng.uniform(-slack, slack)
        # Only the object's cell is drawn: pixels [top, top + span) x [left, left + span).
        span = int(np.ceil(cell))
        top = min(int(obj.row * cell), image_size - span)
        left = min(int(obj.column * cell), image_size - span)
        samples = (np.arange(2 * span, dtype=np.float32) + 0.5) / 2
        inside = _coverage(obj, centre_y - top, centre_x - left, half, samples[:, None], samples[None, :])
        alpha = inside.reshape(span, 2, span, 2).sum(axis=(1, 3), dtype=np.float32)[..., None] / 4
        colour = (np.asarray(COLOURS[obj.colour]) + rng.uniform(-12, 12, size=3)).astype(np.float32)
        window = image[top:top + span, left:left + span]
        window += alpha * (colour - window)
    image += 8 * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB -> JPEG bytes; full-resolution chroma keeps small objects' colours."""
    return tf.io.encode_jpeg(pixels, quality=92, chroma_downsampling=False).numpy()


def _write_atomically(path: str, data: bytes) -> None:
    """Writes a temporary file and renames it: readers never see a partial file."""
    tmp_path = path + ".tmp"
    with open(tmp_path, "wb") as out:
        out.write(data)
    os.replace(tmp_path, path)


# ----------------------------------------------------------------------------- dataset


def _split_rng(seed: int, split: str, purpose: int, index: int = 0) -> np.random.Generator:
    """An independent stream per (seed, split, purpose, index): a split's content does
    not depend on the other splits' sizes."""
    return np.random.default_rng([seed, SPLITS.index(split), purpose, index])


_SCENES, _CAPTIONS, _PIXELS = 0, 1, 2


def split_scenes(split: str, count: int, seed: int) -> list[Scene]:
    """The scenes `generate` draws for one split (unique descriptions in val and test)."""
    return make_scenes(count, _split_rng(seed, split, _SCENES), unique=split in UNIQUE_SPLITS)


def generate(output_dir: str, num_train: int = 8000, num_val: int = 1000, num_test: int = 1000,
             image_size: int = 64, seed: int = 0) -> str:
    """Writes `output_dir/images/*.jpg` and then `output_dir/dataset_synthetic.json`.

    Image ids run over train, then val, then test; sentence ids are imgid * 5 + k.
    A previous dataset JSON is removed first and the new one is written last (temp file
    and rename), so an interrupted run leaves no JSON pointing at missing images.
    Returns the JSON path.
    """
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    for split, count in sizes.items():
        if count < 0:
            raise ValueError(f"num_{split} must be >= 0, got {count}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")

    json_path = os.path.join(output_dir, JSON_NAME)
    image_dir = os.path.join(output_dir, IMAGE_DIR)
    if os.path.exists(json_path):
        os.remove(json_path)
    os.makedirs(image_dir, exist_ok=True)

    digits = max(6, len(str(sum(sizes.values()) - 1)))
    entries, imgid = [], 0
    for split in SPLITS:
        scenes = split_scenes(split, sizes[split], seed)
        caption_rng = _split_rng(seed, split, _CAPTIONS)
        for index, scene in enumerate(scenes):
            filename = f"{imgid:0{digits}d}.jpg"
            pixels = render(scene, image_size, _split_rng(seed, split, _PIXELS, index))
            _write_atomically(os.path.join(image_dir, filename), _encode_jpeg(pixels))
            sentids = [imgid * CAPTIONS_PER_IMAGE + k for k in range(CAPTIONS_PER_IMAGE)]
            sentences = [
                {"tokens": text.tokenize(raw), "raw": raw, "imgid": imgid, "sentid": sentid}
                for raw, sentid in zip(captions(scene, caption_rng), sentids)
            ]
            entries.append({"filepath": IMAGE_DIR, "filename": filename, "imgid": imgid,
                            "split": split, "sentids": sentids, "sentences": sentences})
            imgid += 1

    dataset = {"dataset": DATASET_NAME, "images": entries}
    _write_atomically(json_path, json.dumps(dataset, sort_keys=True).encode("utf-8"))
    return json_path
