"""dual_path.text_path: the layout of the residual text CNN (1x1 -> width-2 -> 1x1 bottlenecks,
stride 2 opening every stage but the first), what each word position sees, and the max pool
over every position, padding included as the module documents. test_model.py checks the
positions per stage and the word embedding's initialisation."""
import keras
import numpy as np
import pytest

from dual_path.text import PAD_ID
from dual_path.text_path import WORD_EMBEDDING, build_text_path

VOCAB_SIZE, MAX_LENGTH = 20, 8


def pre_pool(text_cnn: keras.Model, block: str) -> keras.Model:
    """token ids -> the output of `block` ([B, positions, width]) of the same weights."""
    return keras.Model(text_cnn.input, text_cnn.get_layer(f"{block}_out").output)


def test_every_block_is_a_1x1_width2_1x1_bottleneck_and_later_stages_open_with_stride_2():
    """Embedding dim 8, blocks (2, 2), widths (16, 32): bottlenecks of 4 and 8 channels. A
    block has a projection shortcut where its input's shape differs from its output's (the
    first block of each stage: 8 -> 16 channels, then 16 -> 32 channels and half the
    positions), else the identity."""
    text_cnn = build_text_path(VOCAB_SIZE, MAX_LENGTH, embedding_dim=8, blocks=(2, 2),
                               widths=(16, 32))
    convs = {layer.name: (tuple(layer.kernel.shape), layer.strides) for layer in text_cnn.layers
             if isinstance(layer, keras.layers.Conv1D)}
    assert convs == {
        "text_stage1_block1_shortcut_conv": ((1, 8, 16), (1,)),
        "text_stage1_block1_reduce_conv": ((1, 8, 4), (1,)),
        "text_stage1_block1_width2_conv": ((2, 4, 4), (1,)),
        "text_stage1_block1_expand_conv": ((1, 4, 16), (1,)),
        "text_stage1_block2_reduce_conv": ((1, 16, 4), (1,)),
        "text_stage1_block2_width2_conv": ((2, 4, 4), (1,)),
        "text_stage1_block2_expand_conv": ((1, 4, 16), (1,)),
        "text_stage2_block1_shortcut_conv": ((1, 16, 32), (2,)),
        "text_stage2_block1_reduce_conv": ((1, 16, 8), (1,)),
        "text_stage2_block1_width2_conv": ((2, 8, 8), (2,)),
        "text_stage2_block1_expand_conv": ((1, 8, 32), (1,)),
        "text_stage2_block2_reduce_conv": ((1, 32, 8), (1,)),
        "text_stage2_block2_width2_conv": ((2, 8, 8), (1,)),
        "text_stage2_block2_expand_conv": ((1, 8, 32), (1,)),
    }
    assert all(not layer.use_bias for layer in text_cnn.layers
               if isinstance(layer, keras.layers.Conv1D))
    token_ids = np.random.default_rng(0).integers(0, VOCAB_SIZE, (3, MAX_LENGTH)).astype("int32")
    features = text_cnn(token_ids, training=False)
    assert features.shape == (3, 32) and features.dtype == "float32"
    assert text_cnn.get_layer(WORD_EMBEDDING).embeddings.shape == (VOCAB_SIZE, 8)


def test_a_position_sees_its_word_and_the_next_one():
    """One block: 1x1 convs keep positions apart, the width-2 conv ("same" padding, one zero
    slot appended on the right) mixes position p with p + 1, and the shortcut is the identity
    (embedding dim = width). Changing the word at position 3 therefore changes the block's
    output at positions 2 and 3 only."""
    text_cnn = build_text_path(VOCAB_SIZE, MAX_LENGTH, embedding_dim=8, blocks=(1,), widths=(8,))
    block = pre_pool(text_cnn, "text_stage1_block1")
    words = np.array([[4, 5, 6, 7, 8, 9, 10, 11]], "int32")
    other = words.copy()
    other[0, 3] = 12
    changed = np.abs(block(words, training=False) - block(other, training=False)).max(axis=2)[0]
    assert np.flatnonzero(changed > 1e-6).tolist() == [2, 3]


def test_the_features_are_the_max_over_every_position_padding_included():
    """The output is the max over all L positions of the last block, padding positions
    included (the original does not mask them). With the embedding BN's offset moved off
    zero, as training moves it, padding slots have features of their own, and a max over the
    position that covers the two words alone differs from the output."""
    keras.utils.set_random_seed(0)
    text_cnn = build_text_path(VOCAB_SIZE, MAX_LENGTH, embedding_dim=8, blocks=(1, 1),
                               widths=(8, 16))
    offset = text_cnn.get_layer("word_embedding_bn").beta
    offset.assign(np.random.default_rng(1).normal(size=offset.shape).astype("float32"))
    caption = np.array([[4, 5] + [PAD_ID] * (MAX_LENGTH - 2)], "int32")
    last_block = pre_pool(text_cnn, "text_stage2_block1")(caption, training=False).numpy()
    assert last_block.shape == (1, MAX_LENGTH // 2, 16)
    features = text_cnn(caption, training=False).numpy()
    np.testing.assert_array_equal(features, last_block.max(axis=1))
    # Stage 2 halves the positions: its position 0 covers words 0 and 1, the rest is padding.
    assert not np.allclose(features, last_block[:, :1].max(axis=1))


@pytest.mark.parametrize("blocks, widths, message", [
    ((1, 1), (16,), r"text blocks \(1, 1\) and widths \(16,\) must be non-empty and of the same "
                    r"length"),
    ((), (), r"text blocks \(\) and widths \(\) must be non-empty"),
    ((1, 0), (16, 32), r"every text stage needs at least one block, got blocks \(1, 0\)"),
    ((1, 1), (16, 30), r"text widths \(16, 30\) must be multiples of 4"),
])
def test_a_layout_the_blocks_cannot_build_is_refused(blocks, widths, message):
    with pytest.raises(ValueError, match=message):
        build_text_path(VOCAB_SIZE, MAX_LENGTH, embedding_dim=8, blocks=blocks, widths=widths)
