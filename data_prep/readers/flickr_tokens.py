"""Flickr8k / Flickr30k raw token files with split lists.

The token file (Flickr8k.token.txt, results_20130124.token) has one caption a line:

  1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress is climbing up a set of stairs .

A split list (Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt, ...) names one image
file a line. The split lists decide which images are read, in their order: images of the
token file that no list names are left out (not counted as skipped); a listed image
without captions is skipped. image_id is the file name; the path is image_root/file name.
"""
from typing import Mapping

from data_prep.readers import (
    DUPLICATE_CAPTION_ID,
    LISTED_IMAGE_WITHOUT_CAPTIONS,
    OUTSIDE_IMAGE_ROOT,
    SPLITS,
    RecordCollector,
    content_lines,
    default_image_root,
    path_under_root,
    read_text,
    split_file_paths,
)
from data_prep.records import DataFormatError, ImageRecord, SourceDataset


def read(
    captions: str,
    split_files: str | Mapping[str, str],
    image_root: str | None = None,
    dataset_name: str = "flickr",
    strict: bool = False,
) -> SourceDataset:
    """Reads a Flickr token file and its split lists.

    Args:
      captions: path of the token file.
      split_files: "train=PATH,dev=PATH,test=PATH" or {split: path}; "dev" means "val".
      image_root: the image folder (Flicker8k_Dataset, flickr30k-images); default: the
        token file's folder.
      dataset_name: SourceDataset.name.
      strict: raise DataFormatError instead of skipping bad lines.
    """
    split_paths = split_file_paths(split_files)
    token_text = read_text(captions)
    split_texts = {split: read_text(path) for split, path in split_paths.items()}
    root = image_root or default_image_root(captions)
    collector = RecordCollector(strict)
    captions_by_image = _captions_by_image(captions, token_text, collector)
    for split in SPLITS:
        if split not in split_paths:
            continue
        for item, line in content_lines(split_paths[split], split_texts[split], collector):
            file_name = line.strip()
            image_captions = captions_by_image.get(file_name)
            if image_captions is None:
                collector.skip(item, LISTED_IMAGE_WITHOUT_CAPTIONS, file_name)
                continue
            path = path_under_root(root, file_name)
            if path is None:
                collector.skip(item, OUTSIDE_IMAGE_ROOT, file_name)
                continue
            collector.add(ImageRecord(image_id=file_name, path=path, split=split, captions=image_captions), item)
    return collector.dataset(dataset_name)


def _captions_by_image(path: str, text: str, collector: RecordCollector) -> dict[str, list[str]]:
    """Image file name -> its usable captions, in file order, from a token file's text."""
    captions_by_image: dict[str, list[str]] = {}
    caption_keys = set()
    for item, line in content_lines(path, text, collector):
        caption_key, tab, caption = line.partition("\t")
        file_name, hash_mark, _ = caption_key.rpartition("#")
        if not tab or not hash_mark or not file_name:
            raise DataFormatError(f"{item}: expected 'IMAGE#N<TAB>caption', got {line[:80]!r}")
        if caption_key in caption_keys:
            collector.skip(item, DUPLICATE_CAPTION_ID, caption_key)
            continue
        caption_keys.add(caption_key)
        usable = collector.usable_caption(caption, item)
        if usable is not None:
            captions_by_image.setdefault(file_name, []).append(usable)
    return captions_by_image
