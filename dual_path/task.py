"""The losses of one training batch (Model Garden's Task): what a stage optimises, given the
model's outputs. `training.Trainer` differentiates their total; the loop averages them.

Every value follows `dual_path.losses`' convention: a sum over the replica's rows divided by
the global batch size, so that summing over replicas gives the global-batch mean.
"""
import tensorflow as tf

from dual_path import losses
from dual_path.config import StageConfig, TrainConfig

METRIC_NAMES = ("loss", "rank_loss", "image_loss", "text_loss", "image_accuracy", "text_accuracy")
"""The values of one training step, global-batch means: the total loss, its three terms and
the instance classifiers' top-1 accuracy."""


def hardest_negative(config: TrainConfig, stage: StageConfig) -> bool:
    """Whether the stage's ranking loss takes the hardest negative (else the sum of all)."""
    return config.hardest_negative if stage.hardest_negative is None else stage.hardest_negative


def batch_losses(outputs: dict, labels: tf.Tensor, config: TrainConfig,
                 stage: StageConfig) -> dict:
    """The stage's losses of one replica's batch.

    Args:
      outputs: the training model's {"image_logits", "text_logits": float32 [B, C],
        "image_embedding", "text_embedding": float32 [B, D] (L2-normalised)}.
      labels: int32 [B], the class (training image) of each image-caption pair.

    Returns:
      {METRIC_NAMES: float32 scalar}: "loss" = rank:image:text weights . (ranking loss, image
      instance loss, text instance loss); the ranking loss is 0 (not computed) where its
      weight is 0.
    """
    weights = stage.loss_weights
    image_loss = losses.instance_loss(outputs["image_logits"], labels, config.label_smoothing)
    text_loss = losses.instance_loss(outputs["text_logits"], labels, config.label_smoothing)
    if weights.rank:
        rank_loss = losses.ranking_loss(
            outputs["image_embedding"], outputs["text_embedding"], margin=config.margin,
            hardest_negative=hardest_negative(config, stage), labels=labels)
    else:
        rank_loss = tf.constant(0.0)
    total = weights.rank * rank_loss + weights.image * image_loss + weights.text * text_loss

    def accuracy(logits):
        correct = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels)
        return tf.reduce_sum(tf.cast(correct, tf.float32)) / config.stage_batch_size(stage)

    return {"loss": total, "rank_loss": rank_loss, "image_loss": image_loss,
            "text_loss": text_loss, "image_accuracy": accuracy(outputs["image_logits"]),
            "text_accuracy": accuracy(outputs["text_logits"])}
