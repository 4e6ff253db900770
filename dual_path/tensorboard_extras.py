"""What the trainer writes for TensorBoard besides scalars: a retrieval example of each
validation and the projector's embeddings at the end of a stage.

The retrieval example is data (the query caption, its top-K images from the shards, which is
its own); drawing it as an image is the application's (`experiments/retrieval_example.py`),
handed to the trainer as `draw_retrieval_example`. Without one only the text summary is written.
"""
import os
from typing import Callable, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from dual_path import embeddings, shard_format

RETRIEVAL_EXAMPLE_TOP_K = 5
RETRIEVAL_EXAMPLE_IMAGE_SIZE = 96
"""Side of the example's images, pixels."""
PROJECTOR_TENSOR = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
"""The projector's tensor: validation image embeddings, then their captions' (metadata.tsv order)."""
PROJECTOR_METADATA = "metadata.tsv"

DrawRetrievalExample = Callable[[str, Sequence[np.ndarray], Sequence[bool]], np.ndarray]
"""(query caption, its top-K images uint8 [S, S, 3], whether each is its own) -> uint8 [H, W, 3]."""


class RetrievalExample(NamedTuple):
    """A caption of the split as a query: its text, its image's index, the indices of its
    top-K images (best first) and those images, uint8 [S, S, 3]."""

    query: str
    truth: int
    top: list[int]
    images: list[np.ndarray]


def read_images(shard_dir: str, split: str, indices: Sequence[int], size: int) -> dict:
    """{image index: uint8 [size, size, 3]} for the given image indices of a split."""
    images = {}
    for index, encoded in shard_format.read_encoded_images(shard_dir, split, indices).items():
        image = tf.image.resize(tf.io.decode_jpeg(encoded, channels=3), [size, size], antialias=True)
        images[index] = tf.cast(tf.round(image), tf.uint8).numpy()
    return images


def retrieval_example(shard_dir: str, split: str, caption: str, image_of_caption: int,
                      similarity_to_caption: np.ndarray) -> RetrievalExample:
    """The example of one caption: similarity_to_caption is float32 [N images]."""
    top = np.argsort(-similarity_to_caption, kind="stable")[:RETRIEVAL_EXAMPLE_TOP_K].tolist()
    images = read_images(shard_dir, split, top, RETRIEVAL_EXAMPLE_IMAGE_SIZE)
    return RetrievalExample(caption, int(image_of_caption), top, [images[index] for index in top])


def write_retrieval_example(example: RetrievalExample,
                            draw: DrawRetrievalExample | None) -> None:
    """Summaries (in the current default writer and step) of the example: its text, and the
    image `draw` makes of it where there is a draw."""
    if draw is not None:
        grid = draw(example.query, example.images, [index == example.truth for index in example.top])
        tf.summary.image(f"retrieval_example/text_to_top{RETRIEVAL_EXAMPLE_TOP_K}_images",
                         grid[np.newaxis])
    tf.summary.text("retrieval_example/query",
                    f"{example.query} (its image: {example.truth}; top {len(example.top)}: {example.top})")


def write_projector(log_dir: str, split_embeddings: embeddings.SplitEmbeddings,
                    texts: Sequence[str], num_images: int, step: int) -> None:
    """The first num_images images of a split and their captions (texts: by caption id) as
    TensorBoard projector embeddings in log_dir, saved at `step`."""
    from tensorboard.plugins import projector

    captions = np.flatnonzero(split_embeddings.image_of_text < num_images)
    # TensorBoard lists as runs only folders with event files, and resolves a checkpoint path
    # in projector_config.pbtxt against its own working directory: so the embeddings go into
    # the validation run, and the config names no checkpoint, leaving TensorBoard to find the
    # folder's latest through its `checkpoint` file (relative, so the run can move).
    tf.io.gfile.makedirs(log_dir)
    with tf.io.gfile.GFile(os.path.join(log_dir, PROJECTOR_METADATA), "w") as metadata:
        metadata.write("kind\timage\ttext\n")
        for index in range(num_images):
            metadata.write(f"image\t{index}\t\n")
        for caption_id in captions:
            clean = " ".join(texts[caption_id].split())
            metadata.write(f"caption\t{split_embeddings.image_of_text[caption_id]}\t{clean}\n")
    vectors = np.concatenate([split_embeddings.image[:num_images], split_embeddings.text[captions]])
    tf.train.CheckpointManager(
        tf.train.Checkpoint(embedding=tf.Variable(vectors)), log_dir, max_to_keep=1,
        checkpoint_name="embedding").save(checkpoint_number=step)
    projector_config = projector.ProjectorConfig()
    embedding = projector_config.embeddings.add()
    embedding.tensor_name = PROJECTOR_TENSOR
    embedding.metadata_path = PROJECTOR_METADATA
    projector.visualize_embeddings(log_dir, projector_config)
