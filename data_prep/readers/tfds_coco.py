"""TFDS `coco_captions` (COCO 2014 in the Karpathy splits train/val/test/restval).

The images live inside TFDS, but every reader yields file paths, so this one writes
each image once, with the JPEG bytes TFDS stored (not decoded, not re-encoded), to
image_root/<image id>.jpg: through a temporary file renamed into place, and not
again when the file is already there. Only images that are kept are written.
The dataset must have been prepared (`tfds build coco_captions --data_dir=...`).
image_id is TFDS' "image/id" (the COCO id); captions are captions/text.
"""
import os

import tensorflow_datasets as tfds

from data_prep.readers import RESTVAL, SPLITS, RecordCollector, canonical_split, check_split_argument
from data_prep.records import DataFormatError, ImageRecord, SourceDataset

TFDS_NAME = "coco_captions"
TFDS_SPLITS = SPLITS + (RESTVAL,)


def read(
    image_root: str,
    tfds_data_dir: str | None = None,
    restval_split: str = "train",
    dataset_name: str = TFDS_NAME,
    strict: bool = False,
) -> SourceDataset:
    """Reads coco_captions from TFDS and writes its images under image_root.

    Args:
      image_root: folder the JPEG files are written to (created if needed).
      tfds_data_dir: TFDS data_dir; default: TFDS' own (~/tensorflow_datasets).
      restval_split: where "restval" images go.
      dataset_name: SourceDataset.name.
      strict: raise DataFormatError instead of skipping bad examples.
    """
    check_split_argument(restval_split, "restval_split")
    builder = tfds.builder(TFDS_NAME, data_dir=tfds_data_dir)
    try:
        datasets = {
            split: builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
            for split in TFDS_SPLITS
        }
    except AssertionError as error:  # as_dataset's way of saying the data were not prepared
        raise DataFormatError(
            f"{builder.data_dir}: {TFDS_NAME} is not prepared there ({error}); "
            f"run `tfds build {TFDS_NAME} --data_dir=...` first"
        ) from error
    os.makedirs(image_root, exist_ok=True)
    root = os.path.abspath(image_root)
    collector = RecordCollector(strict)
    for tfds_split, dataset in datasets.items():
        split = canonical_split(tfds_split, restval_split)
        examples = dataset.map(
            lambda example: (example["image"], example["image/id"], example["captions"]["text"])
        )
        for jpeg_bytes, coco_id, texts in examples.as_numpy_iterator():
            image_id = str(int(coco_id))
            item = f"tfds {TFDS_NAME}/{tfds_split}: image {image_id}"
            captions = collector.usable_captions([text.decode("utf-8", "surrogateescape") for text in texts], item)
            path = os.path.join(root, f"{image_id}.jpg")
            if collector.add(ImageRecord(image_id=image_id, path=path, split=split, captions=captions), item):
                _write_once(path, jpeg_bytes)
    return collector.dataset(dataset_name)


def _write_once(path: str, data: bytes) -> None:
    """Writes data to path unless the file exists; a reader never sees a partial file."""
    if os.path.exists(path):
        return
    temporary_path = f"{path}.tmp-{os.getpid()}"
    with open(temporary_path, "wb") as image_file:
        image_file.write(data)
    os.replace(temporary_path, path)
