"""A split's retrieval embeddings, computed with the trained encoders as the original tests do.

Images: the embedding of the whole image plus that of its horizontal mirror, summed and
L2-normalised again (`flip_images`; turn it off where captions say left or right and the
mirror would not match them). Texts: with `shift_texts`, the sum of the caption's
embeddings at every position of its max_length slots (the original's test sums over all
33 - length placements), L2-normalised again; else the caption at slot 0.

Rows come back in index order whatever the strategy: image row n is image index n, text
row m is caption id m.
"""
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from dual_path import input_pipeline

DEFAULT_IMAGE_BATCH = 64
DEFAULT_TEXT_BATCH = 256


class SplitEmbeddings(NamedTuple):
    """image: float32 [N, D]; text: float32 [M, D] (both L2-normalised rows);
    image_of_text: int32 [M], the image index of each caption."""

    image: np.ndarray
    text: np.ndarray
    image_of_text: np.ndarray


def _l2_normalise(features: tf.Tensor) -> tf.Tensor:
    return tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)


def embed_images(image_encoder: keras.Model, images: tf.Tensor, flip_images: bool) -> tf.Tensor:
    """float32 [B, S, S, 3] RGB 0..255 -> float32 [B, D], L2-normalised (inference mode)."""
    embedding = tf.cast(image_encoder(images, training=False), tf.float32)
    if flip_images:
        embedding += tf.cast(image_encoder(tf.image.flip_left_right(images), training=False),
                             tf.float32)
    return _l2_normalise(embedding)


def embed_texts(text_encoder: keras.Model, token_ids: tf.Tensor, shift_texts: bool) -> tf.Tensor:
    """int32 [B, L] token ids placed from slot 0 -> float32 [B, D], L2-normalised.

    With shift_texts, the caption (length n) is encoded at each offset 0..L-n and the
    embeddings are summed: one encoder call on B*L rows, the offsets past L-n masked out.
    """
    if not shift_texts:
        return _l2_normalise(text_encoder(token_ids, training=False))
    max_length = token_ids.shape[1]
    lengths = tf.reduce_sum(tf.cast(token_ids != 0, tf.int32), axis=1)  # [B]
    # Padding is at the end, so rolling right by k places the caption at slot k for k <= L-n.
    shifted = tf.stack([tf.roll(token_ids, shift, axis=1) for shift in range(max_length)], axis=1)
    embedding = text_encoder(tf.reshape(shifted, [-1, max_length]), training=False)
    embedding = tf.reshape(tf.cast(embedding, tf.float32), [-1, max_length, embedding.shape[-1]])
    valid = tf.range(max_length)[tf.newaxis, :] <= (max_length - lengths)[:, tf.newaxis]  # [B, L]
    return _l2_normalise(tf.reduce_sum(embedding * tf.cast(valid, tf.float32)[..., tf.newaxis], 1))


def _run_in_index_order(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset, step,
                        index_key: str, count: int) -> np.ndarray:
    """Runs `step` (a batch -> (gathered embeddings, gathered indices)) over a dataset
    distributed on the strategy; returns float32 [count, D], row i = index i."""
    rows = None
    seen = np.zeros(count, bool)
    for batch in strategy.experimental_distribute_dataset(input_pipeline.sharded_by_data(dataset)):
        embedding, index = (tensor.numpy() for tensor in step(batch))
        if rows is None:
            rows = np.zeros((count, embedding.shape[1]), np.float32)
        rows[index] = embedding
        seen[index] = True
    if not seen.all():
        raise ValueError(f"{index_key}: {int(np.argmin(seen))} never came out of the {count} "
                         "expected (the shards do not match the manifest's count)")
    return rows


class SplitEmbedder:
    """Embeds whole splits with fixed encoders and options; its compiled steps are reused
    from split to split (the trainer validates with one every epoch).

    Args:
      image_encoder, text_encoder: `DualPath.image_encoder` / `.text_encoder`.
      image_size, max_length: the model's S and L.
      flip_images: add the mirrored image's embedding (the original's test).
      shift_texts: sum the caption over all its positions (L encoder rows per caption,
        so text_batch_size is divided by L).
      strategy: where to run; default the current one (`tf.distribute.get_strategy()`).
    """

    def __init__(self, image_encoder: keras.Model, text_encoder: keras.Model, *, image_size: int,
                 max_length: int, flip_images: bool = True, shift_texts: bool = False,
                 image_batch_size: int = DEFAULT_IMAGE_BATCH,
                 text_batch_size: int = DEFAULT_TEXT_BATCH,
                 strategy: tf.distribute.Strategy | None = None):
        self.image_size = image_size
        self.max_length = max_length
        self.image_batch_size = image_batch_size
        self.text_batch_size = max(1, text_batch_size // max_length) if shift_texts else text_batch_size
        self.strategy = strategy or tf.distribute.get_strategy()
        self._image_step = self._distributed_step(
            lambda images: embed_images(image_encoder, images, flip_images), "image", "image_index")
        self._text_step = self._distributed_step(
            lambda token_ids: embed_texts(text_encoder, token_ids, shift_texts), "token_ids",
            "caption_id")

    def _distributed_step(self, encode, input_key: str, index_key: str):
        strategy = self.strategy

        @tf.function(reduce_retracing=True)
        def step(batch):
            def replica_fn(inputs):
                return encode(inputs[input_key]), inputs[index_key]

            embedding, index = strategy.run(replica_fn, args=(batch,))
            return strategy.gather(embedding, axis=0), strategy.gather(index, axis=0)

        return step

    def __call__(self, shard_dir: str, split: str) -> SplitEmbeddings:
        """SplitEmbeddings of every image and caption of `split` (its shards in shard_dir),
        in index order (image row n = image index n, text row m = caption id m)."""
        manifest = input_pipeline.load_manifest(shard_dir)
        num_images = input_pipeline.split_count(manifest, split, input_pipeline.MANIFEST_NUM_IMAGES)
        num_captions = input_pipeline.split_count(manifest, split,
                                                  input_pipeline.MANIFEST_NUM_CAPTIONS)
        images = input_pipeline.eval_image_dataset(
            shard_dir, split, batch_size=self.image_batch_size, image_size=self.image_size)
        image_embedding = _run_in_index_order(self.strategy, images, self._image_step,
                                              f"{shard_dir} ({split}) image index", num_images)
        captions = input_pipeline.eval_caption_dataset(
            shard_dir, split, batch_size=self.text_batch_size, max_length=self.max_length)
        text_embedding = _run_in_index_order(self.strategy, captions, self._text_step,
                                             f"{shard_dir} ({split}) caption id", num_captions)
        image_of_text = input_pipeline.read_captions(shard_dir, split).image_index
        return SplitEmbeddings(image_embedding, text_embedding, image_of_text)
