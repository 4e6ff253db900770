"""tf.data pipelines from the TFRecord shards of `shard_format` to model-ready batches.

Five pipelines:

* `train_dataset`: every training image once per epoch, repeated forever, each paired
  with ONE of its captions drawn at random every epoch, augmented as in the paper
  (random-resized crop, horizontal flip that swaps "left"/"right" in the caption,
  random position of the caption in its max_length slots).
* `augmented_view_dataset`: a fixed number of augmented views of every image, once (for a
  cache of the frozen backbone's features, `dual_path.feature_cache`).
* `cached_feature_dataset`: `train_dataset` with one cached view's features in place of the image.
* `eval_image_dataset`: every image of a split once, in index order, whole and resized.
* `eval_caption_dataset`: every caption of a split once, in caption-id order.

Captions are small: all caption shards of a split are read once into memory (`read_captions`).
Images are streamed from their shards.

Determinism: the training streams are epochs of steps_per_epoch batches each (the N mod B
images an epoch leaves out differ from epoch to epoch). Epoch e's order is a function of
(seed, e) alone, and every random choice is a stateless op whose seed is derived from (seed,
the element's position in the stream), so batches depend only on the seed, not on thread
scheduling (with deterministic=True, which also fixes element order). A stream started at
step s (`start_step`, a resume) is the uninterrupted stream from batch s: epoch s //
steps_per_epoch, its first s % steps_per_epoch batches skipped as serialized records, before
anything is decoded. No order depends on TensorFlow's global seed; the trainer still sets it
from --seed (`keras.utils.set_random_seed`) for the initial weights.

Images come out as float32 in 0..255 with no model-specific normalisation: the model does that.
"""
import dataclasses
import json

import numpy as np
import tensorflow as tf

from dual_path import shard_format, text

FLIP_MODES = ("swap_left_right", "plain", "off")
# Words that name a side of the image; a horizontal flip turns each prefix into the other.
MIRRORED_PREFIXES = ("left", "right")

DEFAULT_SHUFFLE_BUFFER = 2048  # serialized image Examples held for shuffling (JPEG bytes)
MAX_INTERLEAVED_SHARDS = 16
_CROP_ATTEMPTS = 100
_CAPTION_PARSE_BATCH = 4096

# Manifest layout read here (data_prep.build_shards): {"splits": {split: {"images": int, "captions": int}}}.
MANIFEST_SPLITS = "splits"
MANIFEST_NUM_IMAGES = "images"
MANIFEST_NUM_CAPTIONS = "captions"

# Added to a run's seed for the views BatchNorm statistics are re-estimated on.
BATCH_NORM_SEED_OFFSET = 7_919


def load_manifest(shard_dir: str) -> dict:
    """The manifest JSON written next to the shards by `data_prep.build_shards`."""
    path = shard_format.manifest_path(shard_dir)
    try:
        with tf.io.gfile.GFile(path, "r") as manifest_file:
            manifest = json.loads(manifest_file.read())
    except tf.errors.NotFoundError as error:
        raise FileNotFoundError(f"{path}: no shard manifest (run dual-path-build-shards first)") from error
    except (tf.errors.OpError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the shard manifest: {error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the shard manifest is not valid JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: the shard manifest must be a JSON object")
    return manifest


def split_count(manifest: dict, split: str, count: str = MANIFEST_NUM_IMAGES) -> int:
    """manifest["splits"][split][count], e.g. the number of images of a split."""
    try:
        return int(manifest[MANIFEST_SPLITS][split][count])
    except (KeyError, TypeError) as error:
        raise KeyError(f"the shard manifest has no {MANIFEST_SPLITS}.{split}.{count}") from error


def steps_per_epoch(manifest: dict, batch_size: int, split: str = "train", drop_remainder: bool = True) -> int:
    """Batches in one pass over a split's images; drop_remainder as in `train_dataset`."""
    num_images = split_count(manifest, split, MANIFEST_NUM_IMAGES)
    if drop_remainder:
        return num_images // batch_size
    return -(-num_images // batch_size)


@dataclasses.dataclass(frozen=True)
class Captions:
    """All captions of one split, in caption-id order (row m is caption id m); M captions.

    token_ids: tf.RaggedTensor of int32, [M, (length)], unpadded token ids.
    image_index: np.ndarray of int32, [M], the image each caption describes.
    label: np.ndarray of int32, [M], the instance class of that image.
    """

    token_ids: tf.RaggedTensor
    image_index: np.ndarray
    label: np.ndarray

    @property
    def num_images(self) -> int:
        """1 + the largest image index; every image below it has at least one caption."""
        return int(self.image_index.max()) + 1


def read_captions(shard_dir: str, split: str) -> Captions:
    """Reads every caption shard of a split into memory and checks the ids are complete.

    Raises ValueError naming the shard (unreadable record) or the split (caption ids that
    are not 0..M-1, an image index with no caption).
    """
    token_values, token_lengths, caption_ids, image_index, labels = [], [], [], [], []
    for path in shard_format.shard_files(shard_dir, split, shard_format.CAPTIONS):
        batches = (
            tf.data.TFRecordDataset(path)
            .batch(_CAPTION_PARSE_BATCH)
            .map(lambda serialized: tf.io.parse_example(serialized, shard_format.CAPTION_FEATURES))
        )
        try:
            for batch in batches:
                ids = tf.RaggedTensor.from_sparse(batch[shard_format.CAPTION_TOKEN_IDS])
                token_values.append(ids.flat_values.numpy())
                token_lengths.append(ids.row_lengths().numpy())
                caption_ids.append(batch[shard_format.CAPTION_ID].numpy())
                image_index.append(batch[shard_format.IMAGE_INDEX].numpy())
                labels.append(batch[shard_format.IMAGE_LABEL].numpy())
        except tf.errors.OpError as error:
            raise ValueError(f"{path}: unreadable caption shard: {error.message}") from error
    where = f"{shard_dir} ({split} captions)"
    if not caption_ids:
        raise ValueError(f"{where}: the caption shards hold no captions")
    caption_ids = np.concatenate(caption_ids)
    order = np.argsort(caption_ids, kind="stable")
    if not np.array_equal(caption_ids[order], np.arange(len(caption_ids))):
        raise ValueError(f"{where}: caption ids are not 0..{len(caption_ids) - 1}, each once")
    token_ids = tf.RaggedTensor.from_row_lengths(
        np.concatenate(token_values).astype(np.int32), np.concatenate(token_lengths)
    )
    image_index = np.concatenate(image_index).astype(np.int32)[order]
    if image_index.min() < 0:
        raise ValueError(f"{where}: negative image index {image_index.min()}")
    without_caption = np.flatnonzero(np.bincount(image_index) == 0)
    if without_caption.size:
        raise ValueError(f"{where}: image index {without_caption[0]} has no caption")
    return Captions(
        token_ids=tf.gather(token_ids, order),
        image_index=image_index,
        label=np.concatenate(labels).astype(np.int32)[order],
    )


def left_right_swap_table(vocabulary: text.Vocabulary) -> np.ndarray:
    """The token-id permutation that a horizontal flip applies to a caption.

    A word starting with "left" and the word with that prefix replaced by "right" swap ids
    when both are in the vocabulary (left/right, leftmost/rightmost, lefthand/righthand, ...);
    every other id maps to itself.

    Returns:
      np.ndarray of int32, [vocabulary.size]: table[id] is the id of the mirrored word.
    """
    table = np.arange(vocabulary.size, dtype=np.int32)
    left, right = MIRRORED_PREFIXES
    for word in vocabulary.words:
        if not word.startswith(left):
            continue
        left_id = vocabulary.word_to_id(word)
        right_id = vocabulary.word_to_id(right + word[len(left):])
        if right_id is not None:
            table[left_id], table[right_id] = right_id, left_id
    return table


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> float32 [image_size, image_size, 3] in 0..255 (bilinear, antialiased)."""
    resized = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.ensure_shape(resized, [image_size, image_size, 3])


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """A whole encoded image as evaluation sees it (no crop, no flip); exported SavedModels use it too.

    Args:
      encoded: tf.string [], JPEG (as in the shards) or PNG bytes (GIF, BMP, WebP: first frame).
    Returns:
      float32 [image_size, image_size, 3], RGB in 0..255.
    Raises:
      tf.errors.InvalidArgumentError: the bytes are empty or not an image of those formats.
    """
    return _resize(tf.io.decode_image(encoded, channels=3, expand_animations=False), image_size)


def _decode_random_crop(encoded: tf.Tensor, seed: tf.Tensor, crop_area, crop_aspect) -> tf.Tensor:
    """Decodes only a random crop of a JPEG.

    Args:
      encoded: tf.string [], JPEG bytes.
      seed: int64 [2], stateless seed.
      crop_area: (min, max) fraction of the image area the crop covers.
      crop_aspect: (min, max) crop width / height.
    Returns:
      uint8 [crop height, crop width, 3].
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(encoded),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=crop_area[0],
        aspect_ratio_range=crop_aspect,
        area_range=crop_area,
        max_attempts=_CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    crop_window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(encoded, crop_window, channels=3)


def _place_caption(token_ids: tf.Tensor, offset: tf.Tensor, max_length: int) -> tf.Tensor:
    """Puts token_ids (int32 [length <= max_length]) at slots offset.. of int32 [max_length] zeros."""
    length = tf.shape(token_ids)[0]
    placed = tf.pad(token_ids, [[offset, max_length - length - offset]])
    return tf.ensure_shape(placed, [max_length])


def _check_args(batch_size: int, image_size: int | None = None, max_length: int | None = None) -> None:
    for name, value in (("batch_size", batch_size), ("image_size", image_size), ("max_length", max_length)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def _check_augmentation(flip: str, crop_area, crop_aspect) -> None:
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    if not (0.0 < crop_area[0] <= crop_area[1] <= 1.0):
        raise ValueError(f"crop_area must satisfy 0 < min <= max <= 1, got {crop_area}")
    if not (0.0 < crop_aspect[0] <= crop_aspect[1]):
        raise ValueError(f"crop_aspect must satisfy 0 < min <= max, got {crop_aspect}")


def _augmented_image(encoded: tf.Tensor, crop_seed: tf.Tensor, flip_seed: tf.Tensor, *, image_size: int,
                     flip: str, crop_area, crop_aspect) -> tuple[tf.Tensor, tf.Tensor]:
    """One training view of a JPEG: a random-resized crop, flipped with probability 1/2.

    Returns:
      (float32 [image_size, image_size, 3] RGB in 0..255, bool [] whether it was flipped;
      always False with flip="off").
    """
    image = _resize(_decode_random_crop(encoded, crop_seed, crop_area, crop_aspect), image_size)
    if flip == "off":
        return image, tf.constant(False)
    flipped = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(flipped, lambda: tf.image.flip_left_right(image), lambda: image)
    return image, flipped


class _CaptionSampler:
    """Draws one caption of an image for training, as the image's view requires.

    Built from all captions of a split (`read_captions`). Calling it with (image_index int32 [],
    flipped bool [], caption_seed, shift_seed: int64 [2]) returns int32 [max_length]: one of the
    image's captions at random (its first max_length ids), its mirrored words swapped when the
    image view was flipped and flip="swap_left_right" (`left_right_swap_table`), placed at a
    random offset of the max_length slots (position_shift) or at slot 0.
    """

    def __init__(self, shard_dir: str, split: str, *, max_length: int, flip: str, position_shift: bool,
                 vocabulary: text.Vocabulary | None):
        captions = read_captions(shard_dir, split)
        per_image_order = np.argsort(captions.image_index, kind="stable")
        by_image = tf.gather(captions.token_ids, per_image_order)
        self._values = by_image.flat_values
        self._row_splits = by_image.row_splits
        counts = np.bincount(captions.image_index)
        first_caption = np.cumsum(counts) - counts
        self._first_caption = tf.constant(first_caption, tf.int64)
        self._count = tf.constant(counts, tf.int32)
        self.num_images = captions.num_images
        self.labels = captions.label[per_image_order][first_caption]
        """int32 [num_images]: the instance class of each image."""
        self._max_length = max_length
        self._position_shift = position_shift
        self._swap_table = None
        if flip == "swap_left_right":
            if vocabulary is None:
                vocabulary = text.Vocabulary.load(text.vocabulary_path(shard_dir))
            largest_id = int(self._values.numpy().max(initial=0))
            if largest_id >= vocabulary.size:
                raise ValueError(
                    f"{shard_dir} ({split} captions): token id {largest_id} is outside the vocabulary "
                    f"of {vocabulary.size} ids"
                )
            self._swap_table = tf.constant(left_right_swap_table(vocabulary))

    def __call__(self, image_index, flipped, caption_seed, shift_seed) -> tf.Tensor:
        choice = tf.random.stateless_uniform(
            [], caption_seed, minval=0, maxval=self._count[image_index], dtype=tf.int32
        )
        row = self._first_caption[image_index] + tf.cast(choice, tf.int64)
        token_ids = self._values[self._row_splits[row]:self._row_splits[row + 1]][:self._max_length]
        if self._swap_table is not None:
            token_ids = tf.cond(flipped, lambda: tf.gather(self._swap_table, token_ids), lambda: token_ids)
        offset = 0
        if self._position_shift:
            free_slots = self._max_length - tf.shape(token_ids)[0]
            offset = tf.random.stateless_uniform([], shift_seed, minval=0, maxval=free_slots + 1, dtype=tf.int32)
        return _place_caption(token_ids, offset, self._max_length)


def _element_seeds(seed: int, position: tf.Tensor, num: int) -> list[tf.Tensor]:
    """num independent stateless seeds (int64 [2] each) of one element of a stream."""
    return tf.unstack(tf.random.experimental.stateless_split(
        tf.stack([tf.constant(seed, tf.int64), tf.cast(position, tf.int64)]), num=num))


def sharded_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with tf.data's DATA auto-shard policy, for `experimental_distribute_dataset`:
    every worker runs the same pipeline and keeps its own replicas' slices of each global
    batch, so a cluster sees the batches of one process, each element once. (FILE sharding
    would let each worker read only its shard files, but then the global batches would depend
    on the number of workers.)"""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _check_one_batch(shard_dir: str, split: str, num_images: int, batch_size: int) -> None:
    if num_images < batch_size:
        raise ValueError(f"{shard_dir} ({split}): {num_images} images, fewer than one batch of "
                         f"{batch_size}: an epoch would have no batch")


def _epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """int64 [2]: the stateless seed of epoch `epoch`'s order."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def _epochs(start_step: int, steps_per_epoch: int, batch_size: int, epoch_elements) -> tf.data.Dataset:
    """(position int64 [], element) of epochs start_step // steps_per_epoch, ... forever.

    Epoch e is epoch_elements(e: int64 []) cut to its first steps_per_epoch * batch_size
    elements; position = e * steps_per_epoch * batch_size + the element's index in its epoch.
    The first start_step % steps_per_epoch batches' worth is skipped here, before the caller
    maps anything over the elements.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    per_epoch = steps_per_epoch * batch_size
    first_epoch, done_batches = divmod(start_step, steps_per_epoch)

    def epoch(e):
        return (epoch_elements(e).take(per_epoch).enumerate()
                .map(lambda index, element: (e * per_epoch + index, element)))

    return (tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
            .flat_map(epoch)
            .skip(done_batches * batch_size))


def _interleaved_image_records(shard_dir: str, split: str, *, seed: tf.Tensor | None,
                               deterministic: bool) -> tf.data.Dataset:
    """The split's serialized image Examples, read from its shards in parallel (shard order
    shuffled with the stateless int64 [2] `seed`, or fixed when seed is None)."""
    files = tf.constant(shard_format.shard_files(shard_dir, split, shard_format.IMAGES))
    if seed is not None:
        files = tf.random.experimental.stateless_shuffle(files, seed)
    return tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset,
        cycle_length=MAX_INTERLEAVED_SHARDS,
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )


def train_dataset(
    shard_dir: str,
    *,
    batch_size: int,
    image_size: int,
    max_length: int,
    seed: int,
    vocabulary: text.Vocabulary | None = None,
    flip: str = "swap_left_right",
    position_shift: bool = True,
    crop_area: tuple[float, float] = (0.8, 1.0),
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3),
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    deterministic: bool = True,
    split: str = "train",
    start_step: int = 0,
) -> tf.data.Dataset:
    """Augmented (image, caption) pairs of a split in epochs of N // B batches, forever.

    Per image and epoch: one of its captions at random (at most max_length ids); a random crop
    covering crop_area of the image with width/height in crop_aspect, decoded alone and
    resized to image_size x image_size; a horizontal flip with probability 1/2 unless
    flip="off", which with flip="swap_left_right" also swaps mirrored words of the caption
    (`left_right_swap_table`); the caption placed at a random offset of its max_length slots
    (position_shift) or at slot 0.

    Args:
      shard_dir: folder with the split's image and caption shards (and vocab.txt when
        flip="swap_left_right" and no vocabulary is given).
      vocabulary: for the swap table; default `text.Vocabulary.load(text.vocabulary_path(shard_dir))`.
      shuffle_buffer: serialized image Examples permuted together (a window of the epoch's
        interleaved shard reads), in a new order each epoch.
      deterministic: keep element order fixed (parallel reads and maps in order).
      start_step: the first batch: the stream from 0 without its first start_step batches
        (skipped undecoded; see the module docstring).
    Returns:
      tf.data.Dataset of dicts, B = batch_size, each batch within one epoch (an epoch is N // B
      batches of distinct images):
        "image": float32 [B, image_size, image_size, 3], RGB in 0..255.
        "token_ids": int32 [B, max_length], 0 = padding.
        "label": int32 [B], the instance class.
        "image_index": int32 [B], the image's index in its split.
    """
    _check_args(batch_size, image_size, max_length)
    _check_augmentation(flip, crop_area, crop_aspect)
    sample_caption = _CaptionSampler(shard_dir, split, max_length=max_length, flip=flip,
                                     position_shift=position_shift, vocabulary=vocabulary)
    num_images = sample_caption.num_images
    _check_one_batch(shard_dir, split, num_images, batch_size)

    def augment(position: tf.Tensor, serialized: tf.Tensor) -> dict:
        """position: int64 [] in the repeated stream; serialized: tf.string [] image Example."""
        example = shard_format.parse_image_example(serialized)
        crop_seed, flip_seed, caption_seed, shift_seed = _element_seeds(seed, position, 4)
        image, flipped = _augmented_image(example[shard_format.IMAGE_ENCODED], crop_seed, flip_seed,
                                          image_size=image_size, flip=flip, crop_area=crop_area,
                                          crop_aspect=crop_aspect)
        image_index = tf.cast(example[shard_format.IMAGE_INDEX], tf.int32)
        tf.debugging.assert_less(
            image_index, num_images, message=f"{shard_dir} ({split}): an image index has no caption"
        )
        return {
            "image": image,
            "token_ids": sample_caption(image_index, flipped, caption_seed, shift_seed),
            "label": tf.cast(example[shard_format.IMAGE_LABEL], tf.int32),
            "image_index": image_index,
        }

    def epoch_records(epoch):
        """The epoch's serialized Examples: shards in a permuted order, read interleaved, then
        permuted within consecutive windows of shuffle_buffer records (stateless, seeded by
        (seed, epoch, window): tf.data's shuffle buffer takes no per-epoch seed tensor)."""
        epoch_seed = _epoch_seed(seed, epoch)

        def permuted(index, window):
            window_seed = tf.random.experimental.stateless_fold_in(epoch_seed, index)
            return tf.data.Dataset.from_tensor_slices(
                tf.random.experimental.stateless_shuffle(window, window_seed))

        return (_interleaved_image_records(shard_dir, split, seed=epoch_seed, deterministic=deterministic)
                .batch(shuffle_buffer).enumerate().flat_map(permuted))

    return (
        _epochs(start_step, num_images // batch_size, batch_size, epoch_records)
        .map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def augmented_view_dataset(
    shard_dir: str,
    *,
    views: int,
    batch_size: int,
    image_size: int,
    seed: int,
    flip: str = "swap_left_right",
    crop_area: tuple[float, float] = (0.8, 1.0),
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3),
    split: str = "train",
) -> tf.data.Dataset:
    """`views` augmented views of every image of a split, once: what a feature cache holds.

    View v of image i is the random-resized crop and flip of `train_dataset` drawn with a seed
    of (seed, i, v), so the same arguments always give the same views, in any read order.

    Returns:
      tf.data.Dataset of dicts, one pass, B = batch_size except for a smaller last batch:
        "image": float32 [B, image_size, image_size, 3], RGB in 0..255.
        "flipped": bool [B], whether the view was mirrored (its captions' left/right swap).
        "image_index": int32 [B]; "view": int32 [B] in 0..views-1.
    """
    _check_args(batch_size, image_size)
    _check_augmentation(flip, crop_area, crop_aspect)
    if views < 1:
        raise ValueError(f"views must be positive, got {views}")

    def view(view_index: tf.Tensor, serialized: tf.Tensor) -> dict:
        example = shard_format.parse_image_example(serialized)
        image_index = tf.cast(example[shard_format.IMAGE_INDEX], tf.int32)
        crop_seed, flip_seed = _element_seeds(seed, tf.cast(image_index, tf.int64) * views + view_index, 2)
        image, flipped = _augmented_image(example[shard_format.IMAGE_ENCODED], crop_seed, flip_seed,
                                          image_size=image_size, flip=flip, crop_area=crop_area,
                                          crop_aspect=crop_aspect)
        return {"image": image, "flipped": flipped, "image_index": image_index,
                "view": tf.cast(view_index, tf.int32)}

    return (
        _interleaved_image_records(shard_dir, split, seed=None, deterministic=True)
        .flat_map(lambda serialized: tf.data.Dataset.from_tensors(serialized).repeat(views).enumerate())
        .map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def batch_norm_view_batches(shard_dir: str, *, batch_size: int, image_size: int, seed: int,
                            flip: str = "swap_left_right", split: str = "train"):
    """Full batches of one augmented view of every image of a split, in shard order (the last,
    smaller batch left out): what BatchNorm statistics are re-estimated on
    (`image_path.reestimate_batch_norm_statistics`). The views are `augmented_view_dataset`'s
    with a seed of their own (seed + BATCH_NORM_SEED_OFFSET), not the feature cache's.

    Yields:
      float32 [batch_size, image_size, image_size, 3], RGB in 0..255.
    """
    views = augmented_view_dataset(shard_dir, views=1, batch_size=batch_size, image_size=image_size,
                                   seed=seed + BATCH_NORM_SEED_OFFSET, flip=flip, split=split)
    for batch in views:
        if batch["image"].shape[0] == batch_size:
            yield batch["image"]


def cached_feature_dataset(
    shard_dir: str,
    features: np.ndarray,
    flipped: np.ndarray,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    vocabulary: text.Vocabulary | None = None,
    flip: str = "swap_left_right",
    position_shift: bool = True,
    split: str = "train",
    start_step: int = 0,
) -> tf.data.Dataset:
    """`train_dataset` with cached backbone features of augmented views in place of images.

    Epochs of N // B batches of distinct images, in a new random order each epoch (a function
    of (seed, epoch)), forever, from batch start_step: one of its V cached
    views at random, with one of its captions drawn and placed as `train_dataset` does (the
    caption's left/right swapped when that view was mirrored).

    Args:
      features: float32 [N, V, F], the backbone's pooled features of view v of image i
        (`augmented_view_dataset`); may be a memory map (rows are gathered per batch).
      flipped: bool [N, V], whether each view was mirrored.
    Returns:
      tf.data.Dataset of dicts, B = batch_size:
        "image_features": float32 [B, F]; "token_ids": int32 [B, max_length];
        "label": int32 [B]; "image_index": int32 [B]; "view": int32 [B].
    """
    _check_args(batch_size, max_length=max_length)
    sample_caption = _CaptionSampler(shard_dir, split, max_length=max_length, flip=flip,
                                     position_shift=position_shift, vocabulary=vocabulary)
    num_images, num_views, feature_dim = features.shape
    if num_images != sample_caption.num_images or flipped.shape != (num_images, num_views):
        raise ValueError(
            f"{shard_dir} ({split}): cached features of shape {features.shape} and flips of shape "
            f"{flipped.shape} do not match the split's {sample_caption.num_images} images"
        )
    _check_one_batch(shard_dir, split, num_images, batch_size)
    view_flipped = tf.constant(flipped, tf.bool)
    labels = tf.constant(sample_caption.labels, tf.int32)

    def pair(position: tf.Tensor, image_index: tf.Tensor) -> dict:
        view_seed, caption_seed, shift_seed = _element_seeds(seed, position, 3)
        image_index = tf.cast(image_index, tf.int32)
        view = tf.random.stateless_uniform([], view_seed, minval=0, maxval=num_views, dtype=tf.int32)
        return {
            "token_ids": sample_caption(image_index, view_flipped[image_index, view], caption_seed, shift_seed),
            "label": labels[image_index],
            "image_index": image_index,
            "view": view,
        }

    def gather_features(batch: dict) -> dict:
        rows = tf.numpy_function(lambda images, views: np.asarray(features[images, views], np.float32),
                                 [batch["image_index"], batch["view"]], tf.float32, stateful=False)
        batch["image_features"] = tf.ensure_shape(rows, [batch_size, feature_dim])
        return batch

    def epoch_images(epoch):
        return tf.data.Dataset.from_tensor_slices(tf.random.experimental.stateless_shuffle(
            tf.range(num_images, dtype=tf.int64), _epoch_seed(seed, epoch)))

    return (
        _epochs(start_step, num_images // batch_size, batch_size, epoch_images)
        .map(pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size, drop_remainder=True)
        .map(gather_features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def read_caption_texts(shard_dir: str, split: str) -> tuple[list[str], np.ndarray]:
    """The split's raw captions in caption-id order and the image index of each (int32 [M])."""
    files = shard_format.shard_files(shard_dir, split, shard_format.CAPTIONS)
    texts, caption_ids, image_index = [], [], []
    for path in files:
        try:
            for serialized in tf.data.TFRecordDataset(path):
                caption = shard_format.parse_caption_example(serialized)
                texts.append(caption[shard_format.CAPTION_TEXT].numpy().decode("utf-8"))
                caption_ids.append(int(caption[shard_format.CAPTION_ID]))
                image_index.append(int(caption[shard_format.IMAGE_INDEX]))
        except tf.errors.OpError as error:
            raise ValueError(f"{path}: unreadable caption shard: {error.message}") from error
    if not texts:
        raise ValueError(f"{shard_dir} ({split}): the caption shards hold no captions")
    order = np.argsort(caption_ids, kind="stable")
    return [texts[i] for i in order], np.array(image_index, np.int32)[order]


def eval_image_dataset(shard_dir: str, split: str, *, batch_size: int, image_size: int) -> tf.data.Dataset:
    """Every image of a split once, in index order, whole (no crop, no flip) and resized.

    Returns:
      tf.data.Dataset of dicts, B = batch_size except for a smaller last batch:
        "image": float32 [B, image_size, image_size, 3], RGB in 0..255.
        "image_index": int32 [B], 0, 1, 2, ... across batches.
        "label": int32 [B], the instance class (the person id for CUHK-PEDES).
    """
    _check_args(batch_size, image_size)

    def decode(serialized: tf.Tensor) -> dict:
        example = shard_format.parse_image_example(serialized)
        return {
            "image": decode_and_resize(example[shard_format.IMAGE_ENCODED], image_size),
            "image_index": tf.cast(example[shard_format.IMAGE_INDEX], tf.int32),
            "label": tf.cast(example[shard_format.IMAGE_LABEL], tf.int32),
        }

    files = shard_format.shard_files(shard_dir, split, shard_format.IMAGES)
    return (
        tf.data.TFRecordDataset(files)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def eval_caption_dataset(
    shard_dir: str, split: str, *, batch_size: int, max_length: int, shift: int = 0
) -> tf.data.Dataset:
    """Every caption of a split once, in caption-id order.

    A caption keeps its first max_length ids and starts at slot min(shift, max_length - length).

    Returns:
      tf.data.Dataset of dicts, B = batch_size except for a smaller last batch:
        "token_ids": int32 [B, max_length], 0 = padding.
        "image_index": int32 [B], the image the caption describes.
        "caption_id": int32 [B], 0, 1, 2, ... across batches.
        "label": int32 [B], the instance class of that image.
    """
    _check_args(batch_size, max_length=max_length)
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    captions = read_captions(shard_dir, split)

    def place(caption: dict) -> dict:
        token_ids = caption.pop("token_ids")[:max_length]
        offset = tf.minimum(shift, max_length - tf.shape(token_ids)[0])
        caption["token_ids"] = _place_caption(token_ids, offset, max_length)
        return caption

    return (
        tf.data.Dataset.from_tensor_slices(
            {
                "token_ids": captions.token_ids,
                "image_index": captions.image_index,
                "caption_id": np.arange(len(captions.image_index), dtype=np.int32),
                "label": captions.label,
            }
        )
        .map(place, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
