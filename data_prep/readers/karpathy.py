"""Karpathy split JSON: dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json.

Also the format of the project's synthetic dataset (dataset_synthetic.json). The file:

  {"dataset": "coco",
   "images": [{"filename": "COCO_val2014_000000391895.jpg", "filepath": "val2014",
               "split": "train" | "val" | "test" | "restval", "imgid": 0, "cocoid": 391895,
               "sentences": [{"raw": "A man ...", "tokens": [...], ...}, ...]}, ...]}

Image path: image_root/filepath/filename ("filepath" is optional). image_id: "cocoid"
when present, else the file name. Captions are the "raw" sentences.
"""
import os

from data_prep.readers import (
    OUTSIDE_IMAGE_ROOT,
    UNKNOWN_SPLIT,
    RecordCollector,
    canonical_split,
    check_split_argument,
    default_image_root,
    load_json,
    path_under_root,
    require_fields,
)
from data_prep.records import ImageRecord, SourceDataset


def read(
    captions: str,
    image_root: str | None = None,
    restval_split: str = "train",
    dataset_name: str | None = None,
    strict: bool = False,
) -> SourceDataset:
    """Reads a Karpathy split JSON.

    Args:
      captions: path of the JSON file.
      image_root: folder that "filepath"/"filename" are relative to; default: the JSON's folder.
      restval_split: where "restval" images go.
      dataset_name: SourceDataset.name; default: the file's "dataset" field, else its stem.
      strict: raise DataFormatError instead of skipping bad entries.
    """
    check_split_argument(restval_split, "restval_split")
    content = load_json(captions, dict)
    require_fields(content, {"images": list}, captions)
    root = image_root or default_image_root(captions)
    collector = RecordCollector(strict)
    for index, image in enumerate(content["images"]):
        where = f"{captions}: images[{index}]"
        require_fields(image, {"filename": str, "split": str, "sentences": list}, where)
        if "filepath" in image:
            require_fields(image, {"filepath": str}, where)
        try:
            raws = [sentence["raw"] for sentence in image["sentences"]]
        except (KeyError, TypeError):  # the slow check below says which sentence and why
            for number, sentence in enumerate(image["sentences"]):
                require_fields(sentence, {"raw": str}, f"{where} sentences[{number}]")
            raise
        split = canonical_split(image["split"], restval_split)
        if split is None:
            collector.skip(where, UNKNOWN_SPLIT, repr(image["split"]))
            continue
        relative_path = os.path.join(image.get("filepath", ""), image["filename"])
        path = path_under_root(root, relative_path)
        if path is None:
            collector.skip(where, OUTSIDE_IMAGE_ROOT, relative_path)
            continue
        image_id = str(image["cocoid"]) if "cocoid" in image else image["filename"]
        image_captions = collector.usable_captions(raws, where)
        collector.add(ImageRecord(image_id=image_id, path=path, split=split, captions=image_captions), where)
    if dataset_name is None:
        dataset_name = content.get("dataset")
        if not isinstance(dataset_name, str) or not dataset_name:
            dataset_name = os.path.splitext(os.path.basename(captions))[0]
    return collector.dataset(dataset_name)
