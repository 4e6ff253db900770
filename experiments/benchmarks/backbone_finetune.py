"""Times a training step through the image backbone with only its top trainable against the
whole backbone trainable (run by hand, not a test): what stage II's partial fine-tuning
(`--stage2_backbone_trainable_blocks`, `dual_path.image_path.train_top_of_backbone`) saves.

In one run, on one random batch (images uniform in 0..255) fed again and again, at the same
batch and image size, on this machine's CPU or GPU, each a tf.function of forward, backward and
an SGD update of the trainable weights (the loss the squared norm of the pooled features: the
cost is the backbone's, whatever the loss):

(a) baseline: the whole backbone trainable, BatchNorm in training mode (stage II end to end);
(b) for each N of --trainable_blocks (default: the config's --stage2_backbone_trainable_blocks,
    then 0): only the last N blocks and the layers after them trainable, the rest frozen with its
    BN statistics (N = 0: nothing trains, the forward pass in training mode with no backward);
    (b)/(a) is the speed-up;
(c) the forward pass alone in inference mode (what the feature cache pays once per view).

Every figure is images per second.

The backbone is the training config's, --config and any training flag as train_step takes them
(default: experiments/configs/flickr8k.flags' MobileNetV2), and so is the batch size: stage II's
(--stage2_batch_size, else --batch_size).

    python -m experiments.benchmarks.backbone_finetune --trainable_blocks=10,7,0 \\
        --output_json=experiments/results/benchmarks/backbone_finetune.json
"""
import argparse
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from dual_path.image_path import build_image_backbone, train_top_of_backbone
from experiments import config_flags
from experiments.benchmarks import report, train_step


def _blocks(value: str) -> tuple[int, ...]:
    """An argparse type: comma-separated block counts >= 0 ("7,2,0")."""
    try:
        counts = tuple(int(part) for part in value.split(","))
    except ValueError:
        counts = (-1,)
    if any(count < 0 for count in counts):
        raise argparse.ArgumentTypeError(f"expected comma-separated block counts >= 0, got {value!r}")
    return counts


def _parse_args() -> tuple[argparse.Namespace, dict]:
    """The benchmark's arguments, and the backbone's settings (DualPathConfig fields) of the
    training config (--config and any training flag, as train_step takes them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train_step.add_config_arguments(parser)
    parser.add_argument("--trainable_blocks", type=_blocks, default=None,
                        help="the last N blocks trained in each timed variant (0: none); default: "
                        "the config's --stage2_backbone_trainable_blocks, then 0")
    parser.add_argument("--warmup_steps", type=int, default=2, help="untimed steps (tracing included)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each variant")
    report.add_output_argument(parser)
    args, flag_values = train_step.parse_config_flags(parser)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.trainable_blocks is None:
        configured = flag_values.stage2_backbone_trainable_blocks
        args.trainable_blocks = (configured, 0) if configured else (0,)
    model = config_flags.model_settings(flag_values)
    model["weights"] = train_step.runnable_weights(model["weights"])
    args.batch_size = config_flags.stage_config(flag_values, 2).global_batch_size(flag_values.batch_size)
    return args, model


def training_step(backbone: keras.Model, images: tf.Tensor) -> Callable[[int], tf.Tensor]:
    """A compiled step on the backbone's weights trainable now: forward in training mode, the
    gradient of the features' squared norm, and an SGD update (lr 1e-6, so weights stay sane)."""
    variables = backbone.trainable_variables
    optimizer = keras.optimizers.SGD(learning_rate=1e-6)
    if variables:
        optimizer.build(variables)

    @tf.function(jit_compile=False)
    def step():
        with tf.GradientTape() as tape:
            features = backbone(images, training=True)
            loss = tf.reduce_mean(tf.reduce_sum(tf.square(features), axis=1))
        if variables:
            optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return lambda index: step()


def main() -> None:
    args, model = _parse_args()
    backbone = build_image_backbone(model["backbone"], model["weights"], model["image_size"],
                                    model["alpha"], model["small_cnn_widths"])
    size = model["image_size"]
    images = tf.constant(np.random.default_rng(0).uniform(
        0, 255, (args.batch_size, size, size, 3)).astype("float32"))

    def images_per_s(run_step) -> float:
        return args.steps * args.batch_size / train_step.time_steps(run_step, args.warmup_steps, args.steps)

    train_top_of_backbone(backbone)
    figures = {"whole_backbone_images_per_s": images_per_s(training_step(backbone, images))}
    trained_layers = {}
    for blocks in args.trainable_blocks:
        trained_layers[blocks] = len(train_top_of_backbone(backbone, blocks=blocks))
        figures[f"top_{blocks}_blocks_images_per_s"] = images_per_s(training_step(backbone, images))
    inference = tf.function(lambda: backbone(images, training=False), jit_compile=False)
    figures["forward_inference_images_per_s"] = images_per_s(lambda index: inference())
    baseline = figures["whole_backbone_images_per_s"]
    ratios = {f"top_{blocks}_blocks_over_whole_backbone": figures[f"top_{blocks}_blocks_images_per_s"] / baseline
              for blocks in args.trainable_blocks}
    ratios["forward_inference_over_whole_backbone"] = figures["forward_inference_images_per_s"] / baseline

    print(f"backbone_finetune: {model['backbone']} at {size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps each, on {report.describe(report.machine())}")
    print(f"  whole backbone trainable:       {baseline:8.1f} images/s")
    for blocks in args.trainable_blocks:
        value = figures[f"top_{blocks}_blocks_images_per_s"]
        print(f"  last {blocks} blocks ({trained_layers[blocks]:3d} layers):   {value:8.1f} images/s "
              f"({value / baseline:.2f}x)")
    print(f"  forward pass, inference mode:   {figures['forward_inference_images_per_s']:8.1f} images/s "
          f"({ratios['forward_inference_over_whole_backbone']:.2f}x)")
    if args.output_json:
        settings = {**vars(args), **model,
                    "trained_layers": {str(key): value for key, value in trained_layers.items()}}
        report.write_report(args.output_json, "backbone_finetune", figures, ratios, settings)
        print(f"report: {args.output_json}")


if __name__ == "__main__":
    main()
