"""Users' own data: (image path, caption) rows in a CSV or JSONL file.

CSV: a header row naming the columns `image,caption[,split]` (any order; other
columns are ignored), then one caption a row:

  image,caption,split
  photos/beach.jpg,"Two dogs run on the beach.",train

JSONL: one JSON object a line: {"image": "photos/beach.jpg", "caption": "...", "split": "train"}.

Relative image paths resolve against image_root (default: the file's folder) and must
stay under it; absolute paths are taken as they are. The rows of one image collect
its captions (image_id: the path as first written); its split is the first row's, and a
later row giving another split is skipped. A missing or empty split is default_split;
"dev" means "val", "restval" means "train".
"""
import csv
import io
import json
import os

from data_prep.readers import (
    NOT_UTF8,
    NO_IMAGE_PATH,
    OUTSIDE_IMAGE_ROOT,
    SPLIT_CONFLICT,
    UNKNOWN_SPLIT,
    RecordCollector,
    canonical_split,
    check_split_argument,
    content_lines,
    default_image_root,
    is_utf8,
    path_under_root,
    read_text,
    require_fields,
)
from data_prep.records import DataFormatError, ImageRecord, SourceDataset

FILE_FORMATS = ("csv", "jsonl")

# ("file:line" of the row, image path as written, caption, split or None)
_Row = tuple[str, str, str, str | None]


def read(
    captions: str,
    file_format: str,
    image_root: str | None = None,
    default_split: str = "train",
    dataset_name: str | None = None,
    strict: bool = False,
) -> SourceDataset:
    """Reads a CSV or JSONL caption file.

    Args:
      captions: path of the file.
      file_format: "csv" or "jsonl".
      image_root: folder relative image paths resolve against; default: the file's folder.
      default_split: the split of rows that give none.
      dataset_name: SourceDataset.name; default: the file name without its extension.
      strict: raise DataFormatError instead of skipping bad rows.
    """
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    check_split_argument(default_split, "default_split")
    text = read_text(captions)
    collector = RecordCollector(strict)
    rows = _csv_rows(captions, text, collector) if file_format == "csv" else _jsonl_rows(captions, text, collector)
    root = image_root or default_image_root(captions)
    records_by_path: dict[str, ImageRecord] = {}
    for item, image, caption, split_name in rows:
        split = canonical_split(split_name or default_split)
        if split is None:
            collector.skip(item, UNKNOWN_SPLIT, repr(split_name))
            continue
        if not image.strip():
            collector.skip(item, NO_IMAGE_PATH)
            continue
        path = os.path.normpath(image) if os.path.isabs(image) else path_under_root(root, image)
        if path is None:
            collector.skip(item, OUTSIDE_IMAGE_ROOT, image)
            continue
        usable = collector.usable_caption(caption, item)
        if usable is None:
            continue
        record = records_by_path.setdefault(path, ImageRecord(image_id=image, path=path, split=split, captions=[]))
        if record.split != split:
            collector.skip(item, SPLIT_CONFLICT, f"{image} is in {record.split}")
            continue
        record.captions.append(usable)
    for record in records_by_path.values():
        collector.add(record, f"{captions}: image {record.image_id!r}")
    if dataset_name is None:
        dataset_name = os.path.splitext(os.path.basename(captions))[0]
    return collector.dataset(dataset_name)


def _csv_rows(path: str, text: str, collector: RecordCollector) -> list[_Row]:
    """The rows of a CSV's text; the header is checked before any row is read."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader, [])]
    missing = [name for name in ("image", "caption") if name not in header]
    if missing:
        raise DataFormatError(f"{path}: header {header} lacks column(s) {missing}; expected image,caption[,split]")
    image_column, caption_column = header.index("image"), header.index("caption")
    split_column = header.index("split") if "split" in header else None
    rows = []
    for fields in reader:
        item = f"{path}:{reader.line_num}"
        if not any(field.strip() for field in fields):
            continue
        if not all(is_utf8(field) for field in fields):
            collector.skip(item, NOT_UTF8)
            continue
        if len(fields) != len(header):
            raise DataFormatError(f"{item}: {len(fields)} fields, the header has {len(header)}")
        split = fields[split_column].strip() if split_column is not None else None
        rows.append((f"{path}:{reader.line_num}", fields[image_column], fields[caption_column], split))
    return rows


def _jsonl_rows(path: str, text: str, collector: RecordCollector) -> list[_Row]:
    """The rows of a JSONL file's text, one JSON object a line, all checked before use."""
    rows = []
    for item, line in content_lines(path, text, collector):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{item}: not valid JSON ({error})") from error
        require_fields(row, {"image": str, "caption": str}, item)
        split = row.get("split")
        if split is not None and not isinstance(split, str):
            raise DataFormatError(f"{item}: 'split' should be a string")
        rows.append((item, row["image"], row["caption"], split))
    return rows
