"""MSCOCO caption annotations (captions_train2014.json, captions_val2014.json) with a split file.

Each caption file:

  {"images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", ...}, ...],
   "annotations": [{"image_id": 391895, "id": 770337, "caption": "A man ..."}, ...]}

and each has its own image folder (train2014/, val2014/). image_id is the numeric "id".

The split file says which images are used and where, one image a line:

  <split> <file_name>        e.g.  test COCO_val2014_000000391895.jpg

split is train, val, test or restval (restval goes where restval_split says); file_name is
an images[].file_name of one of the caption files. This is the Karpathy 5K split written
out (train 82,783 + restval 30,504 + val 5,000 + test 5,000 lines); any other split fits
the same form. Records come in split-file order. Images the split file does not name are
left out (not counted as skipped); a named image that is in no caption file, or has no
caption, is skipped.
"""
from typing import Sequence

from data_prep.readers import (
    CAPTION_OF_UNKNOWN_IMAGE,
    DUPLICATE_CAPTION_ID,
    DUPLICATE_FILE_NAME,
    DUPLICATE_IMAGE_ID,
    LISTED_IMAGE_WITHOUT_CAPTIONS,
    OUTSIDE_IMAGE_ROOT,
    UNKNOWN_SPLIT,
    RecordCollector,
    canonical_split,
    check_split_argument,
    comma_list,
    content_lines,
    default_image_root,
    load_json,
    path_under_root,
    read_text,
    require_fields,
)
from data_prep.records import DataFormatError, ImageRecord, SourceDataset


def read(
    captions: str | Sequence[str],
    split_files: str,
    image_root: str | Sequence[str] | None = None,
    restval_split: str = "train",
    dataset_name: str = "coco",
    strict: bool = False,
) -> SourceDataset:
    """Reads COCO caption files and a split file.

    Args:
      captions: caption JSON paths, a list or one comma-separated string.
      split_files: path of the split file (`<split> <file_name>` lines).
      image_root: each caption file's image folder, in the same order (list or comma
        string); default: each caption file's own folder.
      restval_split: where "restval" images go.
      dataset_name: SourceDataset.name.
      strict: raise DataFormatError instead of skipping bad entries.
    """
    check_split_argument(restval_split, "restval_split")
    caption_paths = comma_list(captions)
    roots = comma_list(image_root) if image_root else [default_image_root(path) for path in caption_paths]
    if len(roots) != len(caption_paths):
        raise ValueError(f"{len(caption_paths)} caption files but {len(roots)} image roots: give one root per file")
    contents = [load_json(path, dict) for path in caption_paths]
    for path, content in zip(caption_paths, contents):
        require_fields(content, {"images": list, "annotations": list}, path)
    split_text = read_text(split_files)

    collector = RecordCollector(strict)
    images_by_name: dict[str, tuple[str, str]] = {}
    captions_by_id: dict[str, list[str]] = {}
    for path, root, content in zip(caption_paths, roots, contents):
        _add_images(path, root, content["images"], images_by_name, captions_by_id, collector)
    for path, content in zip(caption_paths, contents):
        _add_captions(path, content["annotations"], captions_by_id, collector)

    for item, line in content_lines(split_files, split_text, collector):
        fields = line.split()
        if len(fields) != 2:
            raise DataFormatError(f"{item}: expected '<split> <file_name>', got {line[:80]!r}")
        split_name, file_name = fields
        split = canonical_split(split_name, restval_split)
        if split is None:
            collector.skip(item, UNKNOWN_SPLIT, repr(split_name))
            continue
        if file_name not in images_by_name:
            collector.skip(item, LISTED_IMAGE_WITHOUT_CAPTIONS, file_name)
            continue
        image_id, image_path = images_by_name[file_name]
        record = ImageRecord(image_id=image_id, path=image_path, split=split, captions=captions_by_id[image_id])
        collector.add(record, item)
    return collector.dataset(dataset_name)


def _add_images(
    path: str,
    root: str,
    images: list,
    images_by_name: dict[str, tuple[str, str]],
    captions_by_id: dict[str, list[str]],
    collector: RecordCollector,
) -> None:
    """Fills file_name -> (image_id, absolute path) and an empty caption list per image id."""
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
        require_fields(image, {"id": int, "file_name": str}, where)
        image_id = str(image["id"])
        file_name = image["file_name"]
        if image_id in captions_by_id:
            collector.skip(where, DUPLICATE_IMAGE_ID, f"image id {image_id!r}")
            continue
        if file_name in images_by_name:
            collector.skip(where, DUPLICATE_FILE_NAME, file_name)
            continue
        image_path = path_under_root(root, file_name)
        if image_path is None:
            collector.skip(where, OUTSIDE_IMAGE_ROOT, file_name)
            continue
        images_by_name[file_name] = (image_id, image_path)
        captions_by_id[image_id] = []


def _add_captions(
    path: str, annotations: list, captions_by_id: dict[str, list[str]], collector: RecordCollector
) -> None:
    """Appends each annotation's usable caption to its image's list; duplicate ids are skipped."""
    annotation_ids = set()
    for index, annotation in enumerate(annotations):
        where = f"{path}: annotations[{index}]"
        require_fields(annotation, {"image_id": int, "caption": str}, where)
        annotation_id = annotation.get("id")
        if annotation_id is not None:
            if annotation_id in annotation_ids:
                collector.skip(where, DUPLICATE_CAPTION_ID, f"caption id {annotation_id!r}")
                continue
            annotation_ids.add(annotation_id)
        image_captions = captions_by_id.get(str(annotation["image_id"]))
        if image_captions is None:
            collector.skip(where, CAPTION_OF_UNKNOWN_IMAGE, f"image id {annotation['image_id']!r}")
            continue
        usable = collector.usable_caption(annotation["caption"], where)
        if usable is not None:
            image_captions.append(usable)
