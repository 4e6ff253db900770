"""CUHK-PEDES person descriptions: reid_raw.json.

A JSON list, one entry per image:

  [{"split": "train" | "val" | "test", "captions": ["The man is wearing ...", ...],
    "file_path": "CUHK01/0363004.png", "processed_tokens": [[...], ...], "id": 1}, ...]

file_path is relative to the dataset's imgs/ folder (pass it as image_root). The
instance class is the person: label = str(id), shared by that person's images.
image_id is the file_path. Images may be PNG; the shard writer re-encodes them.
Captions are long, hence max_length = records.CUHK_PEDES_MAX_LENGTH.
"""
from data_prep.readers import (
    OUTSIDE_IMAGE_ROOT,
    UNKNOWN_SPLIT,
    RecordCollector,
    canonical_split,
    default_image_root,
    load_json,
    path_under_root,
    require_fields,
)
from data_prep.records import CUHK_PEDES_MAX_LENGTH, ImageRecord, SourceDataset


def read(
    captions: str,
    image_root: str | None = None,
    dataset_name: str = "cuhk_pedes",
    strict: bool = False,
) -> SourceDataset:
    """Reads reid_raw.json.

    Args:
      captions: path of reid_raw.json.
      image_root: the folder file_path is relative to (CUHK-PEDES/imgs); default: the
        JSON's folder.
      dataset_name: SourceDataset.name.
      strict: raise DataFormatError instead of skipping bad entries.
    """
    entries = load_json(captions, list)
    root = image_root or default_image_root(captions)
    collector = RecordCollector(strict)
    for index, entry in enumerate(entries):
        where = f"{captions}: [{index}]"
        require_fields(entry, {"split": str, "captions": list, "file_path": str, "id": (int, str)}, where)
        split = canonical_split(entry["split"])
        if split is None:
            collector.skip(where, UNKNOWN_SPLIT, repr(entry["split"]))
            continue
        path = path_under_root(root, entry["file_path"])
        if path is None:
            collector.skip(where, OUTSIDE_IMAGE_ROOT, entry["file_path"])
            continue
        record = ImageRecord(
            image_id=entry["file_path"],
            path=path,
            split=split,
            captions=collector.usable_captions(entry["captions"], where),
            label=str(entry["id"]),
        )
        collector.add(record, where)
    return collector.dataset(dataset_name, max_length=CUHK_PEDES_MAX_LENGTH)
