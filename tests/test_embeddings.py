"""dual_path.embeddings: retrieval embeddings as the original's test computes them, with
stand-in encoders whose outputs are worked out by hand: the image plus its mirror, the caption
summed over the placements that fit it, and whole splits in index order."""
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from dual_path import embeddings, input_pipeline


def first_row_of_red(images, training):
    """[B, S, S, 3] -> [B, S]: the red channel of each image's top row, left to right."""
    assert training is False
    return images[:, 0, :, 0]


def first_occupied_slot(token_ids, training):
    """[B, L] -> one-hot [B, L] of the first slot that holds a word (not padding)."""
    assert training is False
    max_length = token_ids.shape[1]
    return tf.one_hot(tf.argmax(tf.cast(token_ids != 0, tf.int32), axis=1), max_length)


def test_an_image_embeds_alone_or_summed_with_its_mirror_then_normalised():
    """A 2x2 image whose top row is red 3, 4: alone [3, 4] / 5; with the mirror (top row 4, 3)
    [3 + 4, 4 + 3] / |.| = [1, 1] / sqrt(2)."""
    images = np.zeros((1, 2, 2, 3), np.float32)
    images[0, 0, :, 0] = [3.0, 4.0]
    np.testing.assert_allclose(embeddings.embed_images(first_row_of_red, images, flip_images=False),
                               [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(embeddings.embed_images(first_row_of_red, images, flip_images=True),
                               [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)


def test_a_caption_sums_its_placements_that_fit_in_one_encoder_call():
    """L = 4. With shift_texts the caption of length n is encoded at slots 0..L-n and summed:
    the first occupied slot is then 0, 1, ..., L-n, one each. Length 2: [1, 1, 1, 0] / sqrt(3)
    (rolling it by 3 wraps it to [6, 0, 0, 5], whose first occupied slot 0 must not count
    again); length 1: [1, 1, 1, 1] / 2; length 4: [1, 0, 0, 0]. Without shift_texts each
    caption stays at slot 0."""
    token_ids = tf.constant([[5, 6, 0, 0], [7, 0, 0, 0], [5, 6, 7, 8]], tf.int32)
    calls = []

    def encoder(rows, training):
        calls.append(tuple(rows.shape))
        return first_occupied_slot(rows, training)

    summed = embeddings.embed_texts(encoder, token_ids, shift_texts=True)
    np.testing.assert_allclose(summed, [[3 ** -0.5] * 3 + [0.0], [0.5] * 4, [1.0, 0.0, 0.0, 0.0]],
                               rtol=1e-6)
    assert calls == [(3 * 4, 4)]
    np.testing.assert_allclose(embeddings.embed_texts(encoder, token_ids, shift_texts=False),
                               [[1.0, 0.0, 0.0, 0.0]] * 3)


@pytest.fixture(scope="module")
def shard_dir(synthetic_shards) -> str:
    """6 train and 5 val synthetic images (5 captions each) -> shards."""
    return synthetic_shards("embeddings", num_train=6, num_val=5, seed=4).shard_dir


def mean_colour(images, training):
    """[B, S, S, 3] -> [B, 3]: each image's mean red, green and blue."""
    return tf.reduce_mean(images, axis=[1, 2])


def token_ids_as_floats(token_ids, training):
    """[B, L] -> [B, L]: the token ids themselves, so that a row says which caption it is."""
    return tf.cast(token_ids, tf.float32)


def test_a_split_embeds_every_caption_and_image_in_index_order(shard_dir):
    """Text row m is caption id m (the token ids as the encoder's output, padded to L, then
    normalised; ids read back from the caption shards); image row n is image index n's
    embedding with its mirror; image_of_text is each caption's image."""
    manifest = input_pipeline.load_manifest(shard_dir)
    max_length, size = manifest["max_length"], 16
    split = embeddings.SplitEmbedder(mean_colour, token_ids_as_floats, image_size=size,
                                     max_length=max_length, image_batch_size=2,
                                     text_batch_size=4)(shard_dir, "val")

    captions = input_pipeline.read_captions(shard_dir, "val")
    assert split.text.shape == (25, max_length)
    padded = captions.token_ids.to_tensor(shape=[25, max_length]).numpy().astype(np.float32)
    np.testing.assert_allclose(split.text, padded / np.linalg.norm(padded, axis=1, keepdims=True),
                               rtol=1e-6)
    np.testing.assert_array_equal(split.image_of_text, captions.image_index)

    expected = np.zeros((5, 3), np.float32)
    for batch in input_pipeline.eval_image_dataset(shard_dir, "val", batch_size=5, image_size=size):
        expected[batch["image_index"].numpy()] = embeddings.embed_images(mean_colour, batch["image"],
                                                                         flip_images=True)
    np.testing.assert_allclose(split.image, expected, rtol=1e-5)
    assert len(np.unique(split.image.round(5), axis=0)) == 5  # the rows tell the images apart


def test_an_image_the_manifest_counts_but_the_shards_lack_is_named(shard_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["val"]["images"] = 6
    (copy / "manifest.json").write_text(json.dumps(manifest))
    embedder = embeddings.SplitEmbedder(mean_colour, first_occupied_slot, image_size=16,
                                        max_length=manifest["max_length"])
    with pytest.raises(ValueError) as error:
        embedder(str(copy), "val")
    assert str(error.value) == (f"{copy} (val) image index: 5 never came out of the 6 expected "
                                "(the shards do not match the manifest's count)")


@pytest.mark.parametrize("shift_texts, text_batch_size, expected", [
    (False, 20, 20), (True, 20, 2), (True, 5, 1)])
def test_summing_over_shifts_divides_the_text_batch_by_the_caption_length(shift_texts,
                                                                          text_batch_size,
                                                                          expected):
    """Each caption is L = 8 encoder rows when summed over its placements, so a batch of B
    captions is B * L rows: B = text_batch_size // L keeps the rows per call (at least 1)."""
    embedder = embeddings.SplitEmbedder(mean_colour, first_occupied_slot, image_size=16,
                                        max_length=8, shift_texts=shift_texts,
                                        text_batch_size=text_batch_size)
    assert embedder.text_batch_size == expected
