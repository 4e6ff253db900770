"""The losses of a batch (dual_path/task.py): the stage's weighted total, its terms, accuracy."""
import numpy as np
import pytest
import tensorflow as tf

from dual_path import losses, task
from dual_path.config import DualPathConfig, LossWeights, StageConfig, TrainConfig


def outputs_and_labels():
    rng = np.random.default_rng(0)
    embedding = tf.math.l2_normalize(tf.constant(rng.normal(size=(4, 6)), tf.float32), axis=1)
    logits = tf.constant([[3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0], [0, 0, 3.0]])  # 3 of 4 right
    labels = tf.constant([0, 1, 1, 2], tf.int32)
    return ({"image_logits": logits, "text_logits": -logits, "image_embedding": embedding,
             "text_embedding": tf.roll(embedding, 1, axis=0)}, labels)


def run_config(**overrides) -> TrainConfig:
    return TrainConfig(model_dir="run", shard_dir="shards",
                       model=DualPathConfig(vocab_size=10, num_classes=3),
                       stages=[StageConfig(stage=1, epochs=1, lr_values=(0.1,), lr_boundaries=(),
                                           loss_weights=LossWeights(1, 1, 1), train_backbone=False)],
                       batch_size=8, margin=0.2, **overrides)


def stage(weights: str, hardest_negative=None, batch_size=None) -> StageConfig:
    return StageConfig(stage=2, epochs=1, lr_values=(0.1,), lr_boundaries=(),
                       loss_weights=LossWeights.parse(weights), train_backbone=True,
                       hardest_negative=hardest_negative, batch_size=batch_size)


def test_the_total_is_the_weighted_sum_and_accuracy_is_over_the_global_batch():
    outputs, labels = outputs_and_labels()
    values = task.batch_losses(outputs, labels, run_config(hardest_negative=False), stage("2:1:0.1"))
    assert set(values) == set(task.METRIC_NAMES)
    expected_rank = losses.ranking_loss(outputs["image_embedding"], outputs["text_embedding"],
                                        margin=0.2, hardest_negative=False, labels=labels)
    assert float(values["rank_loss"]) == pytest.approx(float(expected_rank))
    assert float(values["image_loss"]) == pytest.approx(
        float(losses.instance_loss(outputs["image_logits"], labels)))
    assert float(values["loss"]) == pytest.approx(
        2 * float(values["rank_loss"]) + float(values["image_loss"]) + 0.1 * float(values["text_loss"]))
    # 3 of this replica's 4 rows right, over the global batch of 8.
    assert float(values["image_accuracy"]) == pytest.approx(3 / 8)
    # -logits: argmax is the first of the two zeros, right only for row 2 (label 1).
    assert float(values["text_accuracy"]) == pytest.approx(1 / 8)
    # A stage with its own batch size (--stage2_batch_size): over that global batch of 16.
    own = task.batch_losses(outputs, labels, run_config(), stage("1:1:1", batch_size=16))
    assert float(own["image_accuracy"]) == pytest.approx(3 / 16)


def test_a_zero_ranking_weight_skips_the_ranking_loss_and_a_stage_overrides_hardest_negative():
    outputs, labels = outputs_and_labels()
    assert float(task.batch_losses(outputs, labels, run_config(), stage("0:1:1"))["rank_loss"]) == 0.0
    assert task.hardest_negative(run_config(hardest_negative=False), stage("1:1:1", True)) is True
    assert task.hardest_negative(run_config(hardest_negative=False), stage("1:1:1")) is False
