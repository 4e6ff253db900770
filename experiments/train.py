"""Trains the dual-path model: stage I, stage II or both (`dual-path-train`).

    dual-path-train --flagfile=experiments/configs/flickr30k.flags \\
        --shard_dir=workspace/flickr30k/shards/flickr30k --model_dir=workspace/flickr30k/runs/base

Run the same command again after an interruption: it resumes from the last checkpoint
and skips finished stages. The resolved flags are written to model_dir/flags.txt (a
flagfile) and flags.json; TensorBoard logs to model_dir/logs.
"""
import logging as python_logging
import sys

from absl import app, flags, logging

from dual_path import input_pipeline, instance_classifier, optimization, run_layout, training
from dual_path.model import DualPathConfig

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags; called by run() only, so that importing this module
    defines no flags (see data_prep/build_shards.py)."""
    flags.DEFINE_string("shard_dir", None, "Folder of the dataset's shards, vocab.txt, manifest.json.")
    flags.DEFINE_string("model_dir", None, "Checkpoints, logs, flags and results of this run.")
    flags.DEFINE_enum("stage", "both", ["1", "2", "both"], "Which stage(s) to train.")
    flags.DEFINE_enum("strategy", "default", list(training.STRATEGIES), "tf.distribute strategy.")
    flags.DEFINE_string("tpu", "", "TPU address or name, with --strategy=tpu.")
    flags.DEFINE_bool("mixed_precision", False,
                      "mixed_float16 with dynamic loss scaling (mixed_bfloat16 on TPU).")

    # Model.
    flags.DEFINE_string("backbone", "ResNet50", "keras.applications constructor name, or small_cnn.")
    flags.DEFINE_string("weights", "imagenet", "Backbone weights: imagenet, none, or a weights file.")
    flags.DEFINE_integer("image_size", 224, "Side of the square input image, pixels.")
    flags.DEFINE_float("alpha", None, "MobileNet width multiplier.")
    flags.DEFINE_list("small_cnn_widths", ["32", "64", "128", "256"], "small_cnn block widths.")
    flags.DEFINE_integer("embedding_dim", None,
                         "Word vector size; default: the shards' (manifest.json's embedding.dim, "
                         "the width of word2vec_init.npy). A different value is an error.")
    flags.DEFINE_float("embedding_lr_multiplier", 1e-3, "lr multiplier of the word embedding.")
    flags.DEFINE_list("text_blocks", ["3", "4", "6", "1"], "Bottleneck blocks per text CNN stage.")
    flags.DEFINE_list("text_widths", ["256", "512", "1024", "2048"], "Text CNN stage widths.")
    flags.DEFINE_list("head_dims", ["2048", "2048"], "fc sizes of each path's head; D is the last.")
    flags.DEFINE_float("dropout", 0.75, "Dropout before the classifier (0.75 / 0.5 / 0.8).")
    flags.DEFINE_enum("embedding_point", "bn", ["bn", "relu", "dropout"], "Where the embedding is taken.")
    flags.DEFINE_bool("share_classifier", True, "One instance classifier W for both paths.")
    flags.DEFINE_bool("classifier_bias", False, "Whether the instance classifier has a bias (dense only).")
    flags.DEFINE_enum("classifier", "dense", list(instance_classifier.CLASSIFIERS),
                      "Instance classifier W: dense (the paper's) or cosine (scaled cosine softmax).")
    flags.DEFINE_float("classifier_scale", 16.0, "s of the cosine classifier: logits in [-s, s].")
    flags.DEFINE_float("classifier_lr_multiplier", 1.0, "lr multiplier of the instance classifier.")
    flags.DEFINE_enum("classifier_init", "random", list(instance_classifier.CLASSIFIER_INITS),
                      "random, or imprint: W's columns from the image features of each training "
                      "image, at the start of stage I.")
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the instance losses.")
    flags.DEFINE_enum("word_embedding_init", "word2vec", list(training.WORD_EMBEDDING_INITS),
                      "word2vec: the shard folder's word2vec_init.npy; random: Keras' default init.")

    # Data and losses.
    flags.DEFINE_integer("batch_size", 32, "Global batch size.")
    flags.DEFINE_integer("seed", 0, "Seed of the data order and augmentation.")
    flags.DEFINE_enum("flip", "swap_left_right", ["swap_left_right", "plain", "off"],
                      "Horizontal flips of training images (and left/right in their captions).")
    flags.DEFINE_bool("position_shift", True, "Random caption position in its max_length slots.")
    flags.DEFINE_float("margin", 1.0, "Ranking loss margin (cosine units).")
    flags.DEFINE_bool("hardest_negative", True, "Ranking loss on the hardest negative; else the sum.")
    flags.DEFINE_bool("stage2_hardest_negative", None,
                      "Stage II's ranking loss on the hardest negative (or, --no..., the sum); "
                      "default: --hardest_negative.")
    flags.DEFINE_string("stage1_from", None,
                        "With --stage=2: start from the finished stage I of this other run "
                        "(its model_dir) instead of --model_dir's own.")

    # Optimisation, per stage.
    flags.DEFINE_enum("optimizer", "matconvnet_sgd", list(optimization.OPTIMIZERS),
                      "matconvnet_sgd (the original's), or Keras adam / adamw; all keep the lr "
                      "multipliers.")
    flags.DEFINE_float("momentum", 0.9, "SGD (Nesterov) momentum.")
    flags.DEFINE_float("weight_decay", 1e-4, "L2 weight decay added to the gradient.")
    flags.DEFINE_enum("lr_boundary_unit", "epochs", ["epochs", "steps"], "Unit of --stageN_lr_boundaries.")
    for stage, epochs, weights in ((1, 240, "0:1:1"), (2, 60, "1:1:1")):
        flags.DEFINE_integer(f"stage{stage}_epochs", epochs, f"Epochs of stage {stage}.")
        flags.DEFINE_list(f"stage{stage}_lr_values", ["0.1"] if stage == 1 else ["0.1", "0.01"],
                          f"Stage {stage} learning rates, one more than boundaries.")
        flags.DEFINE_list(f"stage{stage}_lr_boundaries", [] if stage == 1 else ["40"],
                          f"Where stage {stage}'s next learning rate starts.")
        flags.DEFINE_string(f"stage{stage}_loss_weights", weights,
                            f"Stage {stage} loss weights rank:image:text.")
    flags.DEFINE_float("stage2_backbone_lr_multiplier", 0.02,
                       "lr multiplier of the image backbone's weights in stage II (the original's: 0.02).")
    flags.DEFINE_float("stage2_backbone_bn_lr_multiplier", None,
                       "lr multiplier of the backbone's BatchNorm scales and offsets in stage II (the "
                       "original's: 0.001; their moving statistics follow Keras' BN momentum); "
                       "default: --stage2_backbone_lr_multiplier.")
    flags.DEFINE_float("stage2_first_conv_lr_multiplier", None,
                       "lr multiplier of the backbone's first conv kernel in stage II (the original's: "
                       "1e-4); default: --stage2_backbone_lr_multiplier.")
    flags.DEFINE_string("stage2_backbone_trainable_from", None,
                        "Stage II trains the backbone from this layer on (a keras.applications layer "
                        "name, e.g. block_13_expand), the layers below frozen with their BN "
                        "statistics; default: all of it.")
    flags.DEFINE_integer("stage2_backbone_trainable_blocks", None,
                         "Stage II trains only the backbone's last N blocks (block_16, conv5_block3, "
                         "...) and the layers after them, the rest frozen with their BN statistics "
                         "(0: all of it frozen); default: all of it trains.", lower_bound=0)
    flags.DEFINE_integer("stage1_feature_views", 0,
                         "Stage I on cached features of the frozen backbone: this many augmented "
                         "views per image, computed once, one drawn per image and epoch (0: off, "
                         "the backbone runs on a fresh crop every step).")
    flags.DEFINE_string("feature_cache_dir", None,
                        "Where the cached backbone features are kept (default model_dir/feature_cache);"
                        " runs on the same shards and backbone can share it.")
    flags.DEFINE_bool("stage1_train_backbone", False,
                      "Train the image backbone in stage I too (only sensible for a backbone "
                      "without pretrained weights; the paper freezes its ImageNet CNN).")

    # Checkpoints, logs, evaluation.
    flags.DEFINE_integer("checkpoint_every_steps", 1000, "Checkpoint every N steps (0: epochs only).")
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept per stage (besides the best).")
    flags.DEFINE_integer("log_every_steps", 50, "One progress line and summaries every N steps.")
    flags.DEFINE_integer("steps_per_loop", 50,
                         "Training steps per tf.function call, the losses averaged on the device "
                         "(a call also ends at every log, checkpoint and epoch boundary).")
    flags.DEFINE_string("validation_split", "val", "Split validated every epoch (best checkpoint).")
    flags.DEFINE_integer("validate_every_epochs", 1, "Validate every N epochs (and at the end).")
    flags.DEFINE_bool("eval_flip_images", True,
                      "Add the mirrored image's embedding (off where captions say left/right).")
    flags.DEFINE_bool("eval_shift_texts", False, "Sum caption embeddings over all positions.")
    flags.DEFINE_integer("eval_folds", 1, "Evaluate on k folds of the images and average (COCO 1K: 5).")
    flags.DEFINE_bool("evaluate_test", False, "Also report the test split at the end, if present.")
    flags.DEFINE_enum("results_checkpoint", "best", ["best", "last"],
                      "Final results from the best-by-validation or the last checkpoint (use last "
                      "when the validation split is the test set).")
    flags.DEFINE_integer("projector_images", 500, "Validation images in the projector embeddings.")

    flags.mark_flags_as_required(["shard_dir", "model_dir"])


def _ints(values) -> tuple[int, ...]:
    return tuple(int(value) for value in values)


def _floats(values) -> list[float]:
    return [float(value) for value in values]


def model_config(manifest: dict) -> DualPathConfig:
    """The architecture from the flags; vocabulary size, classes, L and the word vector size
    from the manifest.

    Raises:
      app.UsageError: --embedding_dim contradicts the shards' word vectors.
    """
    weights = None if FLAGS.weights.lower() == "none" else FLAGS.weights
    embedding_dim = int(manifest["embedding"]["dim"])
    if FLAGS.embedding_dim is not None and FLAGS.embedding_dim != embedding_dim:
        raise app.UsageError(
            f"--embedding_dim={FLAGS.embedding_dim}, but the shards in {FLAGS.shard_dir} hold "
            f"{embedding_dim}-d word vectors (manifest.json): leave it unset to take theirs")
    return DualPathConfig(
        vocab_size=int(manifest["vocab_size"]), num_classes=int(manifest["num_classes"]),
        max_length=int(manifest["max_length"]), backbone=FLAGS.backbone, weights=weights,
        image_size=FLAGS.image_size, alpha=FLAGS.alpha,
        small_cnn_widths=_ints(FLAGS.small_cnn_widths), embedding_dim=embedding_dim,
        embedding_lr_multiplier=FLAGS.embedding_lr_multiplier,
        text_blocks=_ints(FLAGS.text_blocks), text_widths=_ints(FLAGS.text_widths),
        head_dims=_ints(FLAGS.head_dims), dropout=FLAGS.dropout,
        embedding_point=FLAGS.embedding_point, share_classifier=FLAGS.share_classifier,
        classifier_bias=FLAGS.classifier_bias, classifier=FLAGS.classifier,
        classifier_scale=FLAGS.classifier_scale,
        classifier_lr_multiplier=FLAGS.classifier_lr_multiplier)


def stage_configs() -> list[training.StageConfig]:
    numbers = [1, 2] if FLAGS.stage == "both" else [int(FLAGS.stage)]
    return [
        training.StageConfig(
            stage=number,
            epochs=FLAGS[f"stage{number}_epochs"].value,
            lr_values=_floats(FLAGS[f"stage{number}_lr_values"].value),
            lr_boundaries=_floats(FLAGS[f"stage{number}_lr_boundaries"].value),
            loss_weights=training.LossWeights.parse(FLAGS[f"stage{number}_loss_weights"].value),
            train_backbone=number == 2 or FLAGS.stage1_train_backbone,
            backbone_lr_multiplier=FLAGS.stage2_backbone_lr_multiplier if number == 2 else 1.0,
            **(dict(backbone_bn_lr_multiplier=FLAGS.stage2_backbone_bn_lr_multiplier,
                    first_conv_lr_multiplier=FLAGS.stage2_first_conv_lr_multiplier,
                    backbone_trainable_from=FLAGS.stage2_backbone_trainable_from,
                    backbone_trainable_blocks=FLAGS.stage2_backbone_trainable_blocks)
               if number == 2 else {}),
            feature_views=FLAGS.stage1_feature_views if number == 1 else 0,
            hardest_negative=FLAGS.stage2_hardest_negative if number == 2 else None,
        )
        for number in numbers
    ]


def train_config() -> training.TrainConfig:
    manifest = input_pipeline.load_manifest(FLAGS.shard_dir)
    return training.TrainConfig(
        model_dir=FLAGS.model_dir, shard_dir=FLAGS.shard_dir, model=model_config(manifest),
        stages=stage_configs(), batch_size=FLAGS.batch_size, seed=FLAGS.seed, flip=FLAGS.flip,
        position_shift=FLAGS.position_shift, margin=FLAGS.margin,
        hardest_negative=FLAGS.hardest_negative, momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay, lr_boundary_unit=FLAGS.lr_boundary_unit,
        mixed_precision=FLAGS.mixed_precision, checkpoint_every_steps=FLAGS.checkpoint_every_steps,
        keep_checkpoints=FLAGS.keep_checkpoints, log_every_steps=FLAGS.log_every_steps,
        steps_per_loop=FLAGS.steps_per_loop,
        validation_split=FLAGS.validation_split, validate_every_epochs=FLAGS.validate_every_epochs,
        eval_flip_images=FLAGS.eval_flip_images, eval_shift_texts=FLAGS.eval_shift_texts,
        eval_folds=FLAGS.eval_folds, evaluate_test=FLAGS.evaluate_test,
        results_checkpoint=FLAGS.results_checkpoint,
        projector_images=FLAGS.projector_images, feature_cache_dir=FLAGS.feature_cache_dir,
        word_embedding_init=FLAGS.word_embedding_init, stage1_from=FLAGS.stage1_from,
        optimizer=FLAGS.optimizer, label_smoothing=FLAGS.label_smoothing,
        classifier_init=FLAGS.classifier_init)


def _resolved_flags() -> tuple[str, dict]:
    """This module's flags as flagfile text and as a {name: value} dict."""
    module_flags = FLAGS.get_flags_for_module(sys.modules[__name__])
    values = {flag.name: flag.value for flag in sorted(module_flags, key=lambda flag: flag.name)}
    return "".join(flag.serialize() + "\n" for flag in sorted(module_flags, key=lambda f: f.name)
                   if flag.value is not None), values


class _WithoutTensorFlowInfo(python_logging.Filter):
    """Drops TensorFlow's own INFO lines (one per checkpoint saved) from the progress log."""

    def filter(self, record):
        return record.levelno >= python_logging.WARNING or "/tensorflow/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_WithoutTensorFlowInfo())
    config = train_config()
    strategy = training.create_strategy(FLAGS.strategy, FLAGS.tpu)
    logging.info("strategy %s with %d replicas", FLAGS.strategy, strategy.num_replicas_in_sync)
    if training.is_chief(strategy):
        run_layout.write_run_flags(FLAGS.model_dir, *_resolved_flags())
    try:
        training.train(config, strategy)
    except training.NonFiniteLossError as error:
        logging.error("%s", error)
        sys.exit(f"training stopped: {error}")


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
