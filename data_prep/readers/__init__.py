"""Readers: each format a dataset ships in -> one `data_prep.records.SourceDataset`.

Every reader module has `read(..., strict=False) -> SourceDataset` whose keyword
arguments are named after build_shards' flags, and `read_source(format_name, **kwargs)`
picks the reader by --source_format. Records hold absolute image paths (local files),
a split in {"train", "val", "test"} and the raw captions, stripped of surrounding
whitespace; no reader opens an image file (the shard writer checks them), except
tfds_coco, which writes the images it reads out of TFDS.

Keyword arguments by --source_format (all take `dataset_name` and `strict`):

  karpathy       captions=JSON file (dataset_flickr8k.json, dataset_coco.json, ...),
                 image_root=None, restval_split="train"
  flickr_tokens  captions=token file (Flickr8k.token.txt, results_20130124.token),
                 split_files="train=PATH,val=PATH[,test=PATH]" or {split: path}
                 ("dev" means "val"), image_root=None
  coco           captions="captions_train2014.json,captions_val2014.json" (or a list),
                 image_root="DIR/train2014,DIR/val2014" (same order; or a list),
                 split_files=PATH (lines `<split> <file_name>`, see coco.py),
                 restval_split="train"
  cuhk_pedes     captions=reid_raw.json, image_root=None (the folder `file_path`s are
                 relative to: CUHK-PEDES/imgs)
  tfds_coco      image_root=folder the JPEGs are written to (required),
                 tfds_data_dir=None (TFDS' default), restval_split="train"
  csv, jsonl     captions=CSV or JSONL file, image_root=None, default_split="train"

image_root defaults to the folder of the caption file (per file for coco). Unset
arguments may be passed as None or "" (read_source drops them).

What is wrong with the input, and what happens:
  * unreadable caption or split file, a JSON of the wrong top-level type or with
    missing keys / wrong value types, a line that is not in the format -> DataFormatError
    (naming the file, and the entry or line), before any shard is written;
  * an empty caption, a caption or line that is not valid UTF-8, a duplicate image id or
    caption id, an image path outside the image root, an unknown split name, a listed
    image without captions, an image left with no caption -> skipped via
    `records.skip_or_raise` (DataFormatError under strict=True).
Bad arguments (unknown format, malformed split_files) raise ValueError.
"""
import importlib
import inspect
import json
import os
from typing import Any, Iterator, Mapping, Sequence

from data_prep.records import (
    DEFAULT_MAX_LENGTH,
    DataFormatError,
    ImageRecord,
    SourceDataset,
    Skipped,
    skip_or_raise,
)

# --source_format -> (module in data_prep.readers, arguments that the format name fixes).
# Modules are imported when used, so that only tfds_coco pulls in tensorflow_datasets.
FORMATS = {
    "karpathy": ("karpathy", {}),
    "flickr_tokens": ("flickr_tokens", {}),
    "coco": ("coco", {}),
    "cuhk_pedes": ("cuhk_pedes", {}),
    "tfds_coco": ("tfds_coco", {}),
    "csv": ("csv_jsonl", {"file_format": "csv"}),
    "jsonl": ("csv_jsonl", {"file_format": "jsonl"}),
}

# Skip reasons: one short string per kind of problem (build_shards counts skips by
# reason); the skipped item names the file and line or entry, and the value at fault.
EMPTY_CAPTION = "empty caption"
NOT_UTF8 = "not valid UTF-8"
DUPLICATE_IMAGE_ID = "duplicate image id"
DUPLICATE_CAPTION_ID = "duplicate caption id"
DUPLICATE_FILE_NAME = "duplicate file name"
NO_USABLE_CAPTION = "image has no usable caption"
OUTSIDE_IMAGE_ROOT = "image path outside the image root"
UNKNOWN_SPLIT = "unknown split"
LISTED_IMAGE_WITHOUT_CAPTIONS = "listed image has no captions"
CAPTION_OF_UNKNOWN_IMAGE = "caption of an unknown image id"
SPLIT_CONFLICT = "image already in another split"
NO_IMAGE_PATH = "no image path"

SPLITS = ("train", "val", "test")
# Split names found in datasets' files -> ours; "restval" goes where restval_split says.
_SPLIT_NAMES = {"train": "train", "val": "val", "dev": "val", "test": "test"}
RESTVAL = "restval"


def read_source(format_name: str, **kwargs: Any) -> SourceDataset:
    """Reads a dataset in the format --source_format names.

    kwargs are the reader's keyword arguments (see the module docstring); those that
    are None or "" are left out, so a caller can pass every flag it has.
    """
    if format_name not in FORMATS:
        raise ValueError(f"unknown source format {format_name!r}; known: {sorted(FORMATS)}")
    module_name, fixed_kwargs = FORMATS[format_name]
    read = importlib.import_module(f"{__name__}.{module_name}").read
    given = {key: value for key, value in kwargs.items() if value is not None and value != ""}
    parameters = inspect.signature(read).parameters
    accepted = set(parameters) - set(fixed_kwargs)
    unexpected = sorted(set(given) - accepted)
    if unexpected:
        raise ValueError(
            f"source format {format_name!r} does not take {unexpected}; it takes {sorted(accepted)}"
        )
    missing = sorted(
        name
        for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty and name not in given and name not in fixed_kwargs
    )
    if missing:
        raise ValueError(f"source format {format_name!r} needs {missing}")
    return read(**given, **fixed_kwargs)


def canonical_split(name: str, restval_split: str = "train") -> str | None:
    """"train"/"val"/"test", "dev" -> "val", "restval" -> restval_split; None if unknown."""
    if name == RESTVAL:
        return restval_split
    return _SPLIT_NAMES.get(name)


def check_split_argument(split: str, argument: str) -> str:
    """A split given as an argument (restval_split, default_split), checked."""
    if split not in SPLITS:
        raise ValueError(f"{argument} must be one of {SPLITS}, got {split!r}")
    return split


def comma_list(value: str | Sequence[str]) -> list[str]:
    """"a,b" -> ["a", "b"]; a list or tuple is returned as a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def split_file_paths(value: str | Mapping[str, str]) -> dict[str, str]:
    """"train=PATH,dev=PATH" or {split: path} -> {"train": PATH, "val": PATH}."""
    if isinstance(value, str):
        pairs = []
        for part in comma_list(value):
            split, equals, path = part.partition("=")
            if not equals or not path:
                raise ValueError(f"split_files: expected SPLIT=PATH, got {part!r}")
            pairs.append((split.strip(), path.strip()))
    else:
        pairs = list(value.items())
    paths = {}
    for split, path in pairs:
        ours = _SPLIT_NAMES.get(split)
        if ours is None:
            raise ValueError(f"split_files: unknown split {split!r}; known: {sorted(_SPLIT_NAMES)}")
        if ours in paths:
            raise ValueError(f"split_files: split {ours!r} given twice")
        paths[ours] = path
    if not paths:
        raise ValueError("split_files: no split file given")
    return paths


def default_image_root(caption_path: str) -> str:
    return os.path.dirname(os.path.abspath(caption_path))


def path_under_root(image_root: str, relative_path: str) -> str | None:
    """The absolute, normalised image_root/relative_path; None if it leaves image_root.

    Only the strings are compared (no file system access): `..` components and
    absolute relative_paths that end up outside the root give None.
    """
    root = os.path.abspath(image_root)
    path = os.path.normpath(os.path.join(root, relative_path))
    if not path.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return path


def read_text(path: str) -> str:
    """The whole file as text; bytes that are not UTF-8 become lone surrogates.

    Raises DataFormatError if the file cannot be read. Use `is_utf8` to find the
    lines or strings that held invalid bytes.
    """
    try:
        with open(path, "rb") as text_file:
            data = text_file.read()
    except OSError as error:
        raise DataFormatError(f"{path}: cannot read caption file ({error.strerror})") from error
    return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")


def is_utf8(text: str) -> bool:
    """False for text holding lone surrogates (undecodable bytes from `read_text`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def content_lines(path: str, text: str, collector: "RecordCollector") -> Iterator[tuple[str, str]]:
    """("path:line_number", line) for each non-blank line of a file's text, without its line
    break; a line with undecodable bytes is skipped (NOT_UTF8) through the collector."""
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        item = f"{path}:{line_number}"
        if not is_utf8(line):
            collector.skip(item, NOT_UTF8)
            continue
        yield item, line


def load_json(path: str, top_level_type: type) -> Any:
    """A JSON file's content; DataFormatError unless it parses to top_level_type.

    Invalid UTF-8 inside strings survives as lone surrogates (see `read_text`).
    """
    text = read_text(path)
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(content, top_level_type):
        raise DataFormatError(
            f"{path}: expected a JSON {_json_type_name(top_level_type)} at the top level, "
            f"got {_json_type_name(type(content))}"
        )
    return content


def require_fields(entry: Any, fields: Mapping[str, type | tuple[type, ...]], where: str) -> None:
    """DataFormatError naming `where` unless entry is a dict with these keys and value types."""
    if not isinstance(entry, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {_json_type_name(type(entry))}")
    for key, value_type in fields.items():
        if key not in entry:
            raise DataFormatError(f"{where}: missing key {key!r}")
        value = entry[key]
        if not isinstance(value, value_type) or isinstance(value, bool):
            raise DataFormatError(
                f"{where}: {key!r} should be a {_json_type_name(value_type)}, "
                f"got {_json_type_name(type(value))}"
            )


def _json_type_name(python_type: type | tuple[type, ...]) -> str:
    names = {dict: "object", list: "list", str: "string", int: "integer", float: "number"}
    if isinstance(python_type, tuple):
        return " or ".join(_json_type_name(member) for member in python_type)
    return names.get(python_type, python_type.__name__)


class RecordCollector:
    """Gathers a reader's records and skips.

    Keeps the first record of each image id; every skip goes through
    `records.skip_or_raise`, so strict=True turns it into a DataFormatError.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self.records: list[ImageRecord] = []
        self.skipped: list[Skipped] = []
        self._image_ids: set[str] = set()

    def skip(self, item: str, reason: str, value: Any = None) -> None:
        """Skips item (file and line or entry) for reason; value, if given, is shown with the item."""
        if value is not None:
            item = f"{item} ({value})"
        skip_or_raise(self.skipped, item, reason, self.strict)

    def usable_caption(self, caption: Any, item: str) -> str | None:
        """The caption stripped, or None (skipped) when it is empty or not valid UTF-8.

        Raises DataFormatError when the caption is not a string at all.
        """
        if not isinstance(caption, str):
            raise DataFormatError(f"{item}: caption should be a string, got {_json_type_name(type(caption))}")
        if not is_utf8(caption):
            self.skip(item, NOT_UTF8)
            return None
        stripped = caption.strip()
        if not stripped:
            self.skip(item, EMPTY_CAPTION)
            return None
        return stripped

    def usable_captions(self, captions: Sequence[Any], item: str) -> list[str]:
        """The usable ones of an image's captions; item names the file and image."""
        usable = []
        for number, caption in enumerate(captions):
            stripped = self.usable_caption(caption, f"{item} caption {number}")
            if stripped is not None:
                usable.append(stripped)
        return usable

    def add(self, record: ImageRecord, item: str) -> bool:
        """Keeps record unless its image id was seen before or it has no caption."""
        if record.image_id in self._image_ids:
            self.skip(item, DUPLICATE_IMAGE_ID, f"image id {record.image_id!r}")
            return False
        self._image_ids.add(record.image_id)
        if not record.captions:
            self.skip(item, NO_USABLE_CAPTION, f"image id {record.image_id!r}")
            return False
        self.records.append(record)
        return True

    def dataset(self, name: str, max_length: int = DEFAULT_MAX_LENGTH) -> SourceDataset:
        return SourceDataset(name=name, records=self.records, skipped=self.skipped, max_length=max_length)
