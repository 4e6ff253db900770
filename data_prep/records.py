"""The one in-memory form every reader produces, whatever format the dataset ships in."""
import dataclasses

from absl import logging

# Longest caption in tokens that the model sees; longer ones are truncated.
DEFAULT_MAX_LENGTH = 32
CUHK_PEDES_MAX_LENGTH = 56


class DataFormatError(Exception):
    """Input that cannot be used: the message names the file and the reason.

    Raised before any shard is written for unreadable caption files and files that
    are not in the expected format, and for any skippable problem under --strict.
    """


@dataclasses.dataclass
class ImageRecord:
    """One image and its captions.

    image_id: unique within the dataset (file name for Flickr, the numeric id for COCO).
    path: absolute path of the image file.
    split: "train", "val" or "test".
    captions: raw caption strings, non-empty.
    label: the instance class key; None means the image is its own class (Flickr,
      COCO); CUHK-PEDES gives the person id, shared by that person's images.
    """

    image_id: str
    path: str
    split: str
    captions: list[str]
    label: str | None = None


@dataclasses.dataclass
class Skipped:
    """An input left out: which file or item, and why (one short reason per kind)."""

    item: str
    reason: str


@dataclasses.dataclass
class SourceDataset:
    """All records of a dataset, with what the reader had to skip."""

    name: str
    records: list[ImageRecord]
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    max_length: int = DEFAULT_MAX_LENGTH

    def split(self, name: str) -> list[ImageRecord]:
        return [record for record in self.records if record.split == name]


def skip_or_raise(skipped: list[Skipped], item: str, reason: str, strict: bool) -> None:
    """Records a skippable problem, or raises DataFormatError for it under --strict.

    item names the file (with a line number or id where that helps), reason says why.
    """
    if strict:
        raise DataFormatError(f"{item}: {reason}")
    logging.warning("skipping %s: %s", item, reason)
    skipped.append(Skipped(item=item, reason=reason))
