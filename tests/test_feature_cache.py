"""Stage I on cached backbone features: the views, the cache, the dataset and the trainer.

A tiny synthetic dataset (its captions say left and right) goes through the real data_prep
code; the backbone is a tiny small_cnn. Checks that each cached row is the frozen backbone's
output for that view, that a mirrored view's caption has left/right swapped, that the model
on features equals the model on images, that the cache is keyed by what it depends on, and
that a stage I run on the cache trains and hands over to stage II.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_prep import build_shards
from data_prep.readers import read_source
from dual_path import feature_cache, input_pipeline, text, training
from dual_path.config import DualPathConfig, TrainConfig
from dual_path.model import build_dual_path

from conftest import tiny_model, tiny_stage

IMAGE_SIZE = 32
NUM_TRAIN = 24
VIEWS = 3
BATCH = 8


@pytest.fixture(scope="module")
def shard_dir(synthetic_shards) -> str:
    return synthetic_shards("data", num_train=NUM_TRAIN, num_val=8, image_size=IMAGE_SIZE, seed=1).shard_dir


def model_config(shard_dir: str) -> DualPathConfig:
    """The tiny model sized by the shards in shard_dir."""
    return tiny_model(json.loads(Path(shard_dir, "manifest.json").read_text()))


@pytest.fixture(scope="module")
def model(shard_dir):
    dual_path = build_dual_path(model_config(shard_dir))
    dual_path.backbone.trainable = False
    return dual_path


@pytest.fixture(scope="module")
def cache(model, shard_dir, tmp_path_factory) -> feature_cache.FeatureCache:
    return feature_cache.load_or_compute(model.backbone, shard_dir, str(tmp_path_factory.mktemp("cache")),
                                         views=VIEWS, image_size=IMAGE_SIZE, seed=5)


def test_each_cached_row_is_the_frozen_backbone_on_that_view(model, shard_dir, cache):
    assert cache.features.shape == (NUM_TRAIN, VIEWS, 16)
    views = input_pipeline.augmented_view_dataset(shard_dir, views=VIEWS, batch_size=5,
                                                  image_size=IMAGE_SIZE, seed=5)
    seen = set()
    for batch in views:
        expected = model.backbone(batch["image"], training=False).numpy()
        for row, (image, view) in enumerate(zip(batch["image_index"].numpy(), batch["view"].numpy())):
            np.testing.assert_allclose(cache.features[image, view], expected[row], rtol=1e-5, atol=1e-5)
            assert cache.flipped[image, view] == batch["flipped"][row].numpy()
            seen.add((int(image), int(view)))
    assert len(seen) == NUM_TRAIN * VIEWS
    # Views differ: crops and flips are drawn per view.
    assert not np.allclose(cache.features[:, 0], cache.features[:, 1])
    assert 0 < cache.flipped.mean() < 1


def test_views_are_the_same_in_every_run_and_change_with_the_seed(shard_dir):
    def first_images(seed):
        batch = next(iter(input_pipeline.augmented_view_dataset(
            shard_dir, views=VIEWS, batch_size=6, image_size=IMAGE_SIZE, seed=seed)))
        return batch["image"].numpy()

    np.testing.assert_array_equal(first_images(5), first_images(5))
    assert not np.array_equal(first_images(5), first_images(6))


def test_cached_pairs_swap_left_and_right_exactly_when_the_view_was_mirrored(shard_dir, cache):
    vocabulary = text.Vocabulary.load(text.vocabulary_path(shard_dir))
    swap = input_pipeline.left_right_swap_table(vocabulary)
    left, right = vocabulary.word_to_id("left"), vocabulary.word_to_id("right")
    captions = input_pipeline.read_captions(shard_dir, "train")
    by_image = {}
    for caption_id, image in enumerate(captions.image_index):
        by_image.setdefault(int(image), []).append(tuple(captions.token_ids[caption_id].numpy()))
    dataset = input_pipeline.cached_feature_dataset(shard_dir, cache.features, cache.flipped,
                                                    batch_size=BATCH, max_length=32, seed=3)
    sided = {False: 0, True: 0}
    epochs = 4
    per_epoch = NUM_TRAIN // BATCH
    counts = np.zeros(NUM_TRAIN, int)
    for batch in dataset.take(epochs * per_epoch):
        for row in range(BATCH):
            image, view = int(batch["image_index"][row]), int(batch["view"][row])
            counts[image] += 1
            np.testing.assert_array_equal(batch["image_features"][row], cache.features[image, view])
            tokens = batch["token_ids"][row].numpy()
            tokens = tuple(tokens[tokens != text.PAD_ID])
            mirrored = bool(cache.flipped[image, view])
            expected = [tuple(swap[list(caption)]) if mirrored else caption for caption in by_image[image]]
            assert tokens in expected
            if left in tokens or right in tokens:
                sided[mirrored] += 1
            assert int(batch["label"][row]) == int(captions.label[captions.image_index == image][0])
    # Every image once per epoch; sided captions were drawn with mirrored and plain views.
    np.testing.assert_array_equal(counts, np.full(NUM_TRAIN, epochs))
    assert sided[False] and sided[True]


def test_cached_stream_started_at_a_step_continues_the_uninterrupted_order(shard_dir, cache):
    def stream(start_step, count):
        return list(input_pipeline.cached_feature_dataset(
            shard_dir, cache.features, cache.flipped, batch_size=BATCH, max_length=32, seed=3,
            start_step=start_step).take(count).as_numpy_iterator())

    start_step = NUM_TRAIN // BATCH + 1  # inside the second epoch
    for expected, got in zip(stream(0, start_step + 4)[start_step:], stream(start_step, 4)):
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_the_model_on_features_equals_the_model_on_images(model, shard_dir):
    batch = next(iter(input_pipeline.train_dataset(shard_dir, batch_size=BATCH, image_size=IMAGE_SIZE,
                                                   max_length=32, seed=0)))
    on_images = model.training_model({"image": batch["image"], "token_ids": batch["token_ids"]})
    features = model.backbone(batch["image"], training=False)
    on_features = model.feature_training_model({"image_features": features,
                                                "token_ids": batch["token_ids"]})
    assert set(on_images) == set(on_features)
    for name in on_images:
        np.testing.assert_allclose(on_features[name], on_images[name], rtol=1e-5, atol=1e-5)
    trained = {variable.path for variable in model.feature_training_model.trainable_variables}
    assert trained == {variable.path for variable in model.training_model.trainable_variables}


def test_the_cache_is_reused_and_keyed_by_what_it_depends_on(model, shard_dir, tmp_path):
    first = feature_cache.load_or_compute(model.backbone, shard_dir, str(tmp_path), views=2,
                                          image_size=IMAGE_SIZE, seed=5)
    stamp = os.stat(os.path.join(first.directory, feature_cache.FEATURES_FILE)).st_mtime_ns
    again = feature_cache.load_or_compute(model.backbone, shard_dir, str(tmp_path), views=2,
                                          image_size=IMAGE_SIZE, seed=5)
    assert again.directory == first.directory
    assert os.stat(os.path.join(again.directory, feature_cache.FEATURES_FILE)).st_mtime_ns == stamp
    other_seed = feature_cache.cache_key(model.backbone, shard_dir, split="train", views=2,
                                         image_size=IMAGE_SIZE, seed=6, flip="swap_left_right",
                                         crop_area=(0.8, 1.0), crop_aspect=(0.75, 4 / 3))
    other_backbone = build_dual_path(model_config(shard_dir)).backbone  # other random weights
    other_weights = feature_cache.cache_key(other_backbone, shard_dir, split="train", views=2,
                                            image_size=IMAGE_SIZE, seed=5, flip="swap_left_right",
                                            crop_area=(0.8, 1.0), crop_aspect=(0.75, 4 / 3))
    keys = {os.path.basename(first.directory), other_seed["key"], other_weights["key"]}
    assert len(keys) == 3
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first.directory)]  # no partial folder


def test_shards_of_the_same_images_with_other_word_vectors_share_a_cache_key(model, synthetic_shards,
                                                                              tmp_path):
    """The key follows the split's image shards, not the vocabulary or word vectors: shards
    rebuilt from the same images with another embedding dim share it; other images do not."""
    same_images = synthetic_shards("data", num_train=NUM_TRAIN, num_val=8, image_size=IMAGE_SIZE,
                                   seed=1)
    rebuilt = str(tmp_path / "rebuilt")
    build_shards.build_shards(read_source("karpathy", captions=same_images.captions), rebuilt,
                              splits=("train", "val"), num_image_shards=2, num_caption_shards=1,
                              num_workers=1, embedding_dim=8)
    other_images = synthetic_shards("other", num_train=NUM_TRAIN, num_val=8, image_size=IMAGE_SIZE,
                                    seed=2).shard_dir

    def key(shards, split="train"):
        return feature_cache.cache_key(model.backbone, shards, split=split, views=2,
                                       image_size=IMAGE_SIZE, seed=5, flip="swap_left_right",
                                       crop_area=(0.8, 1.0), crop_aspect=(0.75, 4 / 3))["key"]

    assert json.loads(Path(rebuilt, "manifest.json").read_text())["embedding"]["dim"] == 8
    assert key(rebuilt) == key(same_images.shard_dir)
    assert key(other_images) != key(same_images.shard_dir)
    assert key(same_images.shard_dir, "val") != key(same_images.shard_dir)
    with pytest.raises(ValueError, match="no image shards of split 'test'"):
        key(same_images.shard_dir, "test")


def test_cached_features_need_a_frozen_backbone(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="frozen backbone"):
        TrainConfig(
            model_dir=str(tmp_path), shard_dir=shard_dir, model=model_config(shard_dir),
            stages=[tiny_stage(1, train_backbone=True, feature_views=4)])


def test_stage1_on_cached_features_trains_and_hands_over_to_stage2(shard_dir, tmp_path):
    config = TrainConfig(
        model_dir=str(tmp_path / "run"), shard_dir=shard_dir, model=model_config(shard_dir),
        stages=[tiny_stage(1, epochs=8, feature_views=VIEWS), tiny_stage(2, lr_values=(0.01,))],
        batch_size=BATCH, log_every_steps=3, eval_flip_images=False, projector_images=4,
        validate_every_epochs=8, feature_cache_dir=str(tmp_path / "cache"))
    trainer = training.Trainer(config)
    backbone_before = [weight.numpy().copy() for weight in trainer.model.backbone.weights]
    trainer.run_stage(config.stages[0])
    for before, weight in zip(backbone_before, trainer.model.backbone.weights):
        np.testing.assert_array_equal(before, weight.numpy())
    assert len(os.listdir(tmp_path / "cache")) == 1
    # The instance loss fell on the cached features (logged per interval in TensorBoard).
    logged = []
    for path in sorted((tmp_path / "run" / "logs" / "stage1" / "train").iterdir()):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "loss/image_loss":
                    logged.append(float(tf.make_ndarray(value.tensor)))
    # The first and last two intervals' means: one interval's loss is noisy (a text-loss check
    # of one interval each at lr 0.01 failed about one run in three).
    assert len(logged) >= 4 and np.mean(logged[-2:]) < np.mean(logged[:2]) - 0.2
    trainer.run_stage(config.stages[1])
    results = trainer.final_results(2, json.loads((tmp_path / "run" / "stage2" / "done").read_text()))
    assert np.isfinite(results["metrics"]["val"]["rsum"])


def test_random_word_init_ignores_the_word2vec_vectors(shard_dir, tmp_path):
    def embedding(word_init):
        config = TrainConfig(
            model_dir=str(tmp_path / word_init), shard_dir=shard_dir, model=model_config(shard_dir),
            stages=[tiny_stage(1)], batch_size=BATCH, word_embedding_init=word_init)
        return training.Trainer(config).model.text_cnn.get_layer("word_embedding").embeddings.numpy()

    word2vec = np.load(text.word2vec_init_path(shard_dir))
    np.testing.assert_allclose(embedding("word2vec"), word2vec, rtol=1e-6)
    assert not np.allclose(embedding("random"), word2vec)
    with pytest.raises(ValueError, match="word_embedding_init"):
        embedding("glove")


def test_a_killed_runs_partial_cache_is_removed_by_the_next_run(model, shard_dir, tmp_path):
    key = feature_cache.cache_key(model.backbone, shard_dir, split="train", views=1, image_size=IMAGE_SIZE,
                                  seed=9, flip="swap_left_right", crop_area=(0.8, 1.0),
                                  crop_aspect=(3 / 4, 4 / 3))["key"]
    finished = subprocess_pid_that_has_exited()
    abandoned = tmp_path / f"{key}.partial-{finished}"
    abandoned.mkdir()
    (abandoned / feature_cache.FEATURES_FILE).write_bytes(b"half written")
    alive = tmp_path / f"{key}.partial-1"  # pid 1 always runs
    alive.mkdir()
    cache = feature_cache.load_or_compute(model.backbone, shard_dir, str(tmp_path), views=1,
                                          image_size=IMAGE_SIZE, seed=9)
    assert cache.features.shape[:2] == (NUM_TRAIN, 1)
    assert sorted(os.listdir(tmp_path)) == sorted([key, alive.name])


def subprocess_pid_that_has_exited() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                             capture_output=True, text=True, check=True)
    return int(process.stdout)


def test_computing_a_cache_logs_its_progress(model, shard_dir, tmp_path, monkeypatch):
    """Every batch of 64 views logs the views done so far when asked to log that often."""
    messages = []
    monkeypatch.setattr(feature_cache.logging, "info",
                        lambda message, *args: messages.append(message % args))
    feature_cache.load_or_compute(model.backbone, shard_dir, str(tmp_path), views=6,
                                  image_size=IMAGE_SIZE, seed=5, progress_every_s=0)
    progress = [message for message in messages if " views/s, about " in message]
    total = NUM_TRAIN * 6
    assert [int(message.split()[2]) for message in progress] == [64, 128, total]
    assert all(f" of {total} views " in message for message in progress)
    assert progress[-1].endswith("about 0.0 min left)")
