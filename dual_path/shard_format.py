"""What a TFRecord shard holds, and the shard files' names.

Two kinds of shard per split, written by `data_prep.build_shards`:

* image shards, `{split}-images-00000-of-00016.tfrecord`: one tf.train.Example per
  image with the Model Garden keys where they exist (`image/encoded` JPEG bytes,
  `image/source_id`, `image/filename`, `image/height`, `image/width`,
  `image/class/label`) plus `image/index`, the image's position 0..N-1 in its split.
  Images are assigned to shards in contiguous blocks of index, so reading the shards
  in name order yields the images in index order.
* caption shards, `{split}-captions-00000-of-00004.tfrecord`: one tf.train.Example
  per caption: `caption/token_ids` (int64, unpadded, at most the dataset's max
  length), `caption/text` (the raw UTF-8 caption), `caption/id` (position 0..M-1 in
  its split), `image/index` (its image) and `image/class/label` (its instance class).

The instance class is the image's index in its split (one class per image), or, for
CUHK-PEDES, a dense person id (0..K-1 in sorted id order within the split) shared by that
person's images; evaluation uses the latter to match any image of the same person.
"""
import os
from typing import Sequence

import tensorflow as tf

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_SOURCE_ID = "image/source_id"
IMAGE_FILENAME = "image/filename"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_LABEL = "image/class/label"
IMAGE_INDEX = "image/index"

CAPTION_TOKEN_IDS = "caption/token_ids"
CAPTION_TEXT = "caption/text"
CAPTION_ID = "caption/id"

IMAGES = "images"
CAPTIONS = "captions"
SPLITS = ("train", "val", "test")
SHARD_SUFFIX = ".tfrecord"
MANIFEST_NAME = "manifest.json"


def shard_name(split: str, kind: str, index: int, num_shards: int) -> str:
    """`train-images-00003-of-00016.tfrecord`; kind is IMAGES or CAPTIONS."""
    return f"{split}-{kind}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def shard_files(shard_dir: str, split: str, kind: str) -> list[str]:
    """The complete shards of one split and kind, in name (= index) order."""
    pattern = os.path.join(shard_dir, f"{split}-{kind}-?????-of-?????{SHARD_SUFFIX}")
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {kind} shards for split {split!r} in {shard_dir}")
    return files


def manifest_path(shard_dir: str) -> str:
    return os.path.join(shard_dir, MANIFEST_NAME)


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def image_example(
    jpeg_bytes: bytes,
    source_id: str,
    filename: str,
    height: int,
    width: int,
    label: int,
    index: int,
) -> bytes:
    """A serialized image Example; jpeg_bytes must be an RGB JPEG."""
    features = {
        IMAGE_ENCODED: _bytes(jpeg_bytes),
        IMAGE_FORMAT: _bytes(b"jpeg"),
        IMAGE_SOURCE_ID: _bytes(source_id.encode("utf-8")),
        IMAGE_FILENAME: _bytes(filename.encode("utf-8")),
        IMAGE_HEIGHT: _ints([height]),
        IMAGE_WIDTH: _ints([width]),
        IMAGE_LABEL: _ints([label]),
        IMAGE_INDEX: _ints([index]),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def caption_example(token_ids, text: str, caption_id: int, image_index: int, label: int) -> bytes:
    """A serialized caption Example; token_ids are unpadded ints."""
    features = {
        CAPTION_TOKEN_IDS: _ints(token_ids),
        CAPTION_TEXT: _bytes(text.encode("utf-8")),
        CAPTION_ID: _ints([caption_id]),
        IMAGE_INDEX: _ints([image_index]),
        IMAGE_LABEL: _ints([label]),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


IMAGE_FEATURES = {
    IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
    IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string),
    IMAGE_SOURCE_ID: tf.io.FixedLenFeature([], tf.string),
    IMAGE_FILENAME: tf.io.FixedLenFeature([], tf.string),
    IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    IMAGE_LABEL: tf.io.FixedLenFeature([], tf.int64),
    IMAGE_INDEX: tf.io.FixedLenFeature([], tf.int64),
}

CAPTION_FEATURES = {
    CAPTION_TOKEN_IDS: tf.io.VarLenFeature(tf.int64),
    CAPTION_TEXT: tf.io.FixedLenFeature([], tf.string),
    CAPTION_ID: tf.io.FixedLenFeature([], tf.int64),
    IMAGE_INDEX: tf.io.FixedLenFeature([], tf.int64),
    IMAGE_LABEL: tf.io.FixedLenFeature([], tf.int64),
}


def parse_image_example(serialized: tf.Tensor) -> dict:
    """Parses one serialized image Example into a dict keyed by the constants above."""
    return tf.io.parse_single_example(serialized, IMAGE_FEATURES)


def parse_caption_example(serialized: tf.Tensor) -> dict:
    """Parses one caption Example; CAPTION_TOKEN_IDS comes back as a dense int64 [len]."""
    parsed = tf.io.parse_single_example(serialized, CAPTION_FEATURES)
    parsed[CAPTION_TOKEN_IDS] = tf.sparse.to_dense(parsed[CAPTION_TOKEN_IDS])
    return parsed


def read_encoded_images(shard_dir: str, split: str, indices: Sequence[int]) -> dict[int, bytes]:
    """{image index: the encoded image (JPEG bytes)} of the given image indices of a split,
    from one scan of its image shards that stops once every index is found. An index the
    split does not have is absent from the result."""
    wanted = {int(index) for index in indices}
    found: dict[int, bytes] = {}
    batches = (tf.data.TFRecordDataset(shard_files(shard_dir, split, IMAGES))
               .map(parse_image_example).batch(256))
    for batch in batches:
        for index, encoded in zip(batch[IMAGE_INDEX].numpy(), batch[IMAGE_ENCODED].numpy()):
            if int(index) in wanted:
                found[int(index)] = encoded
        if len(found) == len(wanted):
            break
    return found
