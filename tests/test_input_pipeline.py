"""Tests of dual_path.input_pipeline on small shards written here in the real shard format.

The fixture: 20 images of 48x64 (left half dark, right half bright, so a horizontal flip is
visible), in 3 image shards of contiguous index blocks; image i has 1 + i % 5 captions, written
round-robin over 2 caption shards. Every caption is unique (its first two words name its image
and its number) and holds at least one mirrored word, so a swapped caption differs from every
written one.
"""
import json
import time

import numpy as np
import pytest
import tensorflow as tf

from dual_path import input_pipeline, shard_format, text

NUM_IMAGES = 20
HEIGHT, WIDTH = 48, 64
IMAGE_SHARDS = ((0, 7), (7, 14), (14, 20))
CAPTION_SHARDS = 2
MAX_LENGTH = 8  # some written captions are longer (up to 10 ids): they get truncated
MIRROR = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
SIDE_WORDS = ("left", "right", "leftmost", "rightmost")
FILLERS = ("a", "dog", "runs", "on", "the", "bright", "side", "grass")


def label_of(image_index: int) -> int:
    return image_index // 2  # two images per class, as for a person seen twice


def caption_words(image_index: int, number: int) -> list[str]:
    length = 3 + (image_index + number) % 8
    side = SIDE_WORDS[(image_index + number) % len(SIDE_WORDS)]
    fillers = [FILLERS[(image_index * 3 + number + j) % len(FILLERS)] for j in range(length - 3)]
    return [f"img{image_index}", f"cap{number}", side, *fillers]


def asymmetric_jpeg(image_index: int) -> bytes:
    image = np.empty([HEIGHT, WIDTH, 3], np.uint8)
    image[:, : WIDTH // 2] = 20 + image_index
    image[:, WIDTH // 2 :] = 230 - image_index
    return tf.io.encode_jpeg(image, quality=95).numpy()


class Written:
    """What the fixture wrote: the vocabulary and each caption's ids and image."""

    def __init__(self, shard_dir, vocabulary, captions):
        self.shard_dir = str(shard_dir)
        self.vocabulary = vocabulary
        self.captions = captions  # [(token_ids, image_index)] in caption-id order
        self.image_of = {tuple(ids[:MAX_LENGTH]): image for ids, image in captions}
        self.captions_of = {}
        for ids, image in captions:
            self.captions_of.setdefault(image, set()).add(tuple(ids[:MAX_LENGTH]))

    def mirrored(self, ids) -> tuple:
        words = [self.vocabulary.id_to_word(i) for i in ids]
        return tuple(self.vocabulary.word_to_id(MIRROR.get(word, word)) for word in words)


def write_shards(shard_dir, num_images=NUM_IMAGES) -> Written:
    words = [f"img{i}" for i in range(NUM_IMAGES)] + [f"cap{k}" for k in range(5)]
    words += list(SIDE_WORDS) + list(FILLERS)
    vocabulary = text.Vocabulary(words, [100 - n for n in range(len(words))])
    vocabulary.save(text.vocabulary_path(str(shard_dir)))

    for shard, (begin, end) in enumerate(IMAGE_SHARDS):
        path = shard_dir / shard_format.shard_name("train", shard_format.IMAGES, shard, len(IMAGE_SHARDS))
        with tf.io.TFRecordWriter(str(path)) as writer:
            for i in range(begin, min(end, num_images)):
                writer.write(shard_format.image_example(
                    asymmetric_jpeg(i), f"src{i}", f"{i}.jpg", HEIGHT, WIDTH, label_of(i), i))

    captions = []
    for i in range(num_images):
        for number in range(1 + i % 5):
            tokens = caption_words(i, number)
            captions.append((vocabulary.encode(tokens, max_length=10), i, " ".join(tokens)))
    writers = [
        tf.io.TFRecordWriter(str(shard_dir / shard_format.shard_name("train", shard_format.CAPTIONS, s, CAPTION_SHARDS)))
        for s in range(CAPTION_SHARDS)
    ]
    for caption_id, (ids, i, caption) in enumerate(captions):
        writers[caption_id % CAPTION_SHARDS].write(
            shard_format.caption_example(ids, caption, caption_id, i, label_of(i)))
    for writer in writers:
        writer.close()

    manifest = {"splits": {"train": {"images": num_images, "captions": len(captions)}},
                "num_classes": NUM_IMAGES // 2, "vocab_size": vocabulary.size, "max_length": 10}
    with open(shard_format.manifest_path(str(shard_dir)), "w") as manifest_file:
        json.dump(manifest, manifest_file)
    return Written(shard_dir, vocabulary, [(ids, i) for ids, i, _ in captions])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def train(written, **overrides):
    args = dict(batch_size=10, image_size=16, max_length=MAX_LENGTH, seed=7)
    args.update(overrides)
    return input_pipeline.train_dataset(written.shard_dir, **args)


def examples(dataset, num_batches):
    """The first num_batches batches as a list of per-example dicts of numpy values."""
    out = []
    for batch in dataset.take(num_batches).as_numpy_iterator():
        size = len(batch["image_index"])
        out.extend({key: value[n] for key, value in batch.items()} for n in range(size))
    return out


def caption_run(token_ids):
    """(offset, the non-zero ids) of a placed caption; asserts they are one contiguous run."""
    nonzero = np.flatnonzero(token_ids)
    assert nonzero.size > 0
    assert np.array_equal(nonzero, np.arange(nonzero[0], nonzero[-1] + 1)), token_ids
    return int(nonzero[0]), tuple(int(i) for i in token_ids[nonzero])


def is_flipped(image):
    quarter = image.shape[1] // 4
    return image[:, :quarter].mean() > image[:, -quarter:].mean()


def test_train_batch_shapes_and_dtypes(written):
    batch = next(iter(train(written, batch_size=4, image_size=24)))
    assert set(batch) == {"image", "token_ids", "label", "image_index"}
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == tf.float32
    assert batch["token_ids"].shape == (4, MAX_LENGTH) and batch["token_ids"].dtype == tf.int32
    assert batch["label"].shape == (4,) and batch["label"].dtype == tf.int32
    assert batch["image_index"].shape == (4,) and batch["image_index"].dtype == tf.int32
    image = batch["image"].numpy()
    assert image.min() >= 0.0 and image.max() <= 255.0 and image.max() > 150.0


@pytest.mark.parametrize("deterministic", [True, False])
def test_every_image_once_per_epoch_and_forever(written, deterministic):
    dataset = train(written, batch_size=5, deterministic=deterministic)
    drawn = [e["image_index"] for e in examples(dataset, 3 * NUM_IMAGES // 5)]
    epochs = np.reshape(drawn, [3, NUM_IMAGES])
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_IMAGES))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_each_caption_belongs_to_its_image_and_label(written):
    for example in examples(train(written, flip="off"), 6):
        _, ids = caption_run(example["token_ids"])
        image = written.image_of[ids]
        assert example["image_index"] == image
        assert example["label"] == label_of(image)


def test_left_right_swapped_exactly_when_image_flipped(written):
    counts = {True: 0, False: 0}
    for example in examples(train(written, crop_area=(1.0, 1.0)), 8):
        _, ids = caption_run(example["token_ids"])
        flipped = is_flipped(example["image"])
        counts[flipped] += 1
        originals = written.captions_of[example["image_index"]]
        if flipped:
            assert ids not in originals
            assert written.mirrored(ids) in originals
        else:
            assert ids in originals
    assert counts[True] > 10 and counts[False] > 10


def test_plain_flip_keeps_caption_and_off_never_flips(written):
    plain = examples(train(written, flip="plain", crop_area=(1.0, 1.0)), 6)
    assert any(is_flipped(e["image"]) for e in plain)
    for example in plain:
        assert caption_run(example["token_ids"])[1] in written.captions_of[example["image_index"]]
    off = examples(train(written, flip="off"), 6)
    assert not any(is_flipped(e["image"]) for e in off)


def test_position_shift_bounds(written):
    offsets = set()
    for example in examples(train(written, flip="off"), 8):
        offset, ids = caption_run(example["token_ids"])
        assert offset + len(ids) <= MAX_LENGTH
        offsets.add(offset)
    assert len(offsets) > 3
    for example in examples(train(written, flip="off", position_shift=False), 4):
        assert caption_run(example["token_ids"])[0] == 0


def test_every_caption_of_an_image_gets_drawn(written):
    # 60 epochs: an image's 5 captions all come up unless one is missed 60 times, (4/5)^60 ~ 2e-6,
    # whatever shuffle order TF's global seed (set by any trainer run in this process) gives.
    drawn = {}
    for example in examples(train(written, flip="off", image_size=8, batch_size=20), 60):
        drawn.setdefault(int(example["image_index"]), set()).add(caption_run(example["token_ids"])[1])
    assert drawn == written.captions_of


def test_same_seed_same_batches_other_seed_differs(written):
    first = list(train(written, seed=3).take(5).as_numpy_iterator())
    second = list(train(written, seed=3).take(5).as_numpy_iterator())
    other = list(train(written, seed=4).take(5).as_numpy_iterator())
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["image_index"], c["image_index"]) for a, c in zip(first, other))
    assert any(not np.array_equal(a["token_ids"], c["token_ids"]) for a, c in zip(first, other))


@pytest.mark.parametrize("start_step", [3, 5, 12])  # inside epoch 0, at epoch 1's start, inside 2
def test_a_stream_started_at_a_step_continues_the_uninterrupted_order(written, start_step):
    """A resume at step s trains exactly the batches s, s+1, ... of an uninterrupted run."""
    steps_per_epoch = NUM_IMAGES // 5
    uninterrupted = list(train(written, batch_size=5).take(start_step + 6).as_numpy_iterator())
    resumed = list(train(written, batch_size=5, start_step=start_step).take(6).as_numpy_iterator())
    for expected, got in zip(uninterrupted[start_step:], resumed):
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # Epochs are whole: each epoch's batches hold distinct images, every one of them.
    first_epoch = np.concatenate([batch["image_index"] for batch in uninterrupted[:steps_per_epoch]])
    assert sorted(first_epoch) == list(range(NUM_IMAGES))


def test_random_crop_moves_the_image_content(written):
    whole = examples(train(written, flip="off", crop_area=(1.0, 1.0), image_size=32), 2)
    cropped = examples(train(written, flip="off", image_size=32), 2)
    whole_by_index = {int(e["image_index"]): e["image"] for e in whole}
    differences = [np.abs(e["image"] - whole_by_index[int(e["image_index"])]).max() for e in cropped]
    assert np.mean(np.array(differences) > 50.0) > 0.5  # the dark/bright edge moved


def test_eval_images_every_image_once_in_order_whole(written):
    batches = list(input_pipeline.eval_image_dataset(
        written.shard_dir, "train", batch_size=8, image_size=16).as_numpy_iterator())
    assert [len(b["image_index"]) for b in batches] == [8, 8, 4]
    assert np.concatenate([b["image_index"] for b in batches]).tolist() == list(range(NUM_IMAGES))
    assert np.concatenate([b["label"] for b in batches]).tolist() == [label_of(i) for i in range(NUM_IMAGES)]
    for i, image in enumerate(np.concatenate([b["image"] for b in batches])):
        assert image.dtype == np.float32 and image.shape == (16, 16, 3)
        expected = tf.image.resize(tf.io.decode_jpeg(asymmetric_jpeg(i)), [16, 16], antialias=True)
        np.testing.assert_allclose(image, expected.numpy(), atol=1e-3)
        assert not is_flipped(image)


@pytest.mark.parametrize("shift", [0, 3])
def test_eval_captions_every_caption_once_in_order(written, shift):
    batches = list(input_pipeline.eval_caption_dataset(
        written.shard_dir, "train", batch_size=16, max_length=MAX_LENGTH, shift=shift).as_numpy_iterator())
    total = len(written.captions)
    assert [len(b["caption_id"]) for b in batches] == [16] * (total // 16) + [total % 16]
    assert np.concatenate([b["caption_id"] for b in batches]).tolist() == list(range(total))
    token_ids = np.concatenate([b["token_ids"] for b in batches])
    assert token_ids.dtype == np.int32 and token_ids.shape == (total, MAX_LENGTH)
    image_index = np.concatenate([b["image_index"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    for row, (ids, image), index, label in zip(token_ids, written.captions, image_index, labels):
        kept = ids[:MAX_LENGTH]
        expected = np.zeros(MAX_LENGTH, np.int32)
        offset = min(shift, MAX_LENGTH - len(kept))
        expected[offset:offset + len(kept)] = kept
        np.testing.assert_array_equal(row, expected)
        assert index == image and label == label_of(image)


def test_left_right_swap_table(written):
    table = input_pipeline.left_right_swap_table(written.vocabulary)
    word_id = written.vocabulary.word_to_id
    assert table.shape == (written.vocabulary.size,) and table.dtype == np.int32
    assert table[word_id("left")] == word_id("right") and table[word_id("right")] == word_id("left")
    assert table[word_id("leftmost")] == word_id("rightmost")
    assert table[word_id("rightmost")] == word_id("leftmost")
    moved = np.flatnonzero(table != np.arange(table.size))
    assert sorted(moved) == sorted(word_id(w) for w in SIDE_WORDS)  # "bright" is untouched
    np.testing.assert_array_equal(table[table], np.arange(table.size))


def test_manifest_and_steps_per_epoch(written, tmp_path):
    manifest = input_pipeline.load_manifest(written.shard_dir)
    assert input_pipeline.steps_per_epoch(manifest, 8) == 2
    assert input_pipeline.steps_per_epoch(manifest, 8, drop_remainder=False) == 3
    with pytest.raises(KeyError, match="splits.val.images"):
        input_pipeline.steps_per_epoch(manifest, 8, split="val")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        input_pipeline.load_manifest(str(tmp_path))
    (tmp_path / shard_format.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        input_pipeline.load_manifest(str(tmp_path))


def test_bad_inputs_named(written, tmp_path):
    with pytest.raises(ValueError, match="flip must be one of"):
        train(written, flip="sideways")
    with pytest.raises(FileNotFoundError, match="no images shards for split 'val'"):
        input_pipeline.eval_image_dataset(written.shard_dir, "val", batch_size=4, image_size=8)
    # Only one caption, for image 25: images 0..24 have none, which is refused naming the folder.
    shard_dir = tmp_path / "gap"
    shard_dir.mkdir()
    write_shards(shard_dir)
    path = shard_dir / shard_format.shard_name("train", shard_format.CAPTIONS, 0, CAPTION_SHARDS)
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(shard_format.caption_example([30, 31], "x", 0, 25, 12))
    (shard_dir / shard_format.shard_name("train", shard_format.CAPTIONS, 1, CAPTION_SHARDS)).unlink()
    with pytest.raises(ValueError, match=rf"{shard_dir}.*image index 0 has no caption"):
        input_pipeline.train_dataset(str(shard_dir), batch_size=4, image_size=8, max_length=8, seed=0)


def test_a_batch_larger_than_the_split_is_refused_naming_the_folder(written):
    with pytest.raises(ValueError, match=rf"{written.shard_dir} \(train\): 20 images, fewer than "
                                         r"one batch of 32"):
        train(written, batch_size=32)


def test_throughput_has_no_python_per_element(written):
    dataset = train(written, batch_size=NUM_IMAGES, image_size=64)
    graph = dataset._as_serialized_graph().numpy()
    assert b"PyFunc" not in graph
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(20):
        next(iterator)
    images_per_second = 20 * NUM_IMAGES / (time.perf_counter() - start)
    assert images_per_second > 200, images_per_second
