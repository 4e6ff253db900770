"""The text path's CNN: token ids -> one max-pooled feature vector per caption.

As in the paper (Section 3.1): a 300-d word embedding initialised from word2vec, batch
normalisation, then a deep residual CNN over word positions built from ResNet bottleneck
blocks whose middle convolution has width 2 (the paper's 1x2 kernels), then max pooling over
positions. The default depth is ResNet-50's: 3-4-6-1 blocks at output widths 256/512/1024/2048,
bottleneck width = output width / 4, stride 2 at the start of every stage but the first.

The head that follows (fc -> BN -> ReLU -> fc -> BN -> ReLU -> Dropout) is the same for both
paths and is built in `dual_path.model`.
"""
from typing import Sequence

import keras
import numpy as np

from dual_path.text import PAD_ID

WORD_EMBEDDING = "word_embedding"
"""Name of the Embedding layer; the trainer gives its variable its own learning rate multiplier."""


def _conv_bn(x, filters: int, kernel_size: int, strides: int, name: str):
    """[B, T, C] -> [B, ceil(T / strides), filters]: 1-D convolution ("same" padding), then BN."""
    x = keras.layers.Conv1D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn")(x)


def _bottleneck_block(x, width: int, strides: int, name: str):
    """[B, T, C] -> [B, ceil(T / strides), width].

    1x1 conv to width/4 -> BN -> ReLU -> width-2 conv (with the stride) -> BN -> ReLU ->
    1x1 conv to width -> BN, added to the shortcut (a strided 1x1 conv + BN where the shape
    changes, else the input), then ReLU.
    """
    if strides != 1 or x.shape[-1] != width:
        shortcut = _conv_bn(x, width, 1, strides, f"{name}_shortcut")
    else:
        shortcut = x
    bottleneck = width // 4
    y = _conv_bn(x, bottleneck, 1, 1, f"{name}_reduce")
    y = keras.layers.ReLU(name=f"{name}_reduce_relu")(y)
    y = _conv_bn(y, bottleneck, 2, strides, f"{name}_width2")
    y = keras.layers.ReLU(name=f"{name}_width2_relu")(y)
    y = _conv_bn(y, width, 1, 1, f"{name}_expand")
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _validate(vocab_size, embedding_dim, embedding_init, blocks, widths) -> None:
    if len(blocks) != len(widths) or not blocks:
        raise ValueError(f"text blocks {tuple(blocks)} and widths {tuple(widths)} must be "
                         "non-empty and of the same length (one entry per stage)")
    if any(count < 1 for count in blocks):
        raise ValueError(f"every text stage needs at least one block, got blocks {tuple(blocks)}")
    if any(width < 4 or width % 4 for width in widths):
        raise ValueError(f"text widths {tuple(widths)} must be multiples of 4 (bottleneck = width / 4)")
    if embedding_init is not None and embedding_init.shape != (vocab_size, embedding_dim):
        raise ValueError(f"embedding_init has shape {embedding_init.shape}, expected "
                         f"[vocab_size, embedding_dim] = {(vocab_size, embedding_dim)}")


def build_text_path(
    vocab_size: int,
    max_length: int,
    embedding_dim: int = 300,
    embedding_init: np.ndarray | None = None,
    blocks: Sequence[int] = (3, 4, 6, 1),
    widths: Sequence[int] = (256, 512, 1024, 2048),
) -> keras.Model:
    """The text CNN up to its max pool over word positions.

    Args:
      vocab_size: number of token ids, reserved ones included (`Vocabulary.size`).
      max_length: L, the number of token ids per caption (padded with PAD_ID = 0).
      embedding_dim: size of a word vector (300 for word2vec).
      embedding_init: None (random uniform, padding row zero) or float [vocab_size,
        embedding_dim], e.g. np.load(text.word2vec_init_path(shard_dir)); copied as given.
      blocks: residual bottleneck blocks per stage.
      widths: output channels per stage.

    Returns:
      keras.Model "text_cnn": int32 [B, L] token ids -> [B, widths[-1]] features. Its
      Embedding layer is named WORD_EMBEDDING. Padding positions are not masked: as in the
      original, they take part in the convolutions and the max pool.
    """
    if embedding_init is not None:
        embedding_init = np.asarray(embedding_init)
    _validate(vocab_size, embedding_dim, embedding_init, blocks, widths)
    token_ids = keras.Input(shape=(max_length,), dtype="int32", name="token_ids")
    embedding = keras.layers.Embedding(vocab_size, embedding_dim, name=WORD_EMBEDDING)
    x = embedding(token_ids)
    x = keras.layers.BatchNormalization(name="word_embedding_bn")(x)
    for stage, (block_count, width) in enumerate(zip(blocks, widths), start=1):
        for block in range(1, block_count + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _bottleneck_block(x, width, strides, name=f"text_stage{stage}_block{block}")
    features = keras.layers.GlobalMaxPooling1D(name="text_max_pool")(x)

    if embedding_init is None:
        initial = keras.ops.convert_to_numpy(embedding.embeddings)
        initial[PAD_ID] = 0.0
    else:
        initial = embedding_init
    embedding.embeddings.assign(initial.astype(embedding.embeddings.dtype))
    return keras.Model(token_ids, features, name="text_cnn")
