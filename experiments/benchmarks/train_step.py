"""Times the dual-path training step against an image-only classifier (run by hand, not a test).

In one run, at the same batch size and image size, on this machine's CPU or GPU:

(a) dual-path, stage II: the whole model trainable; the instance loss of both paths plus the
    ranking loss, their gradients and the MatConvNet SGD update
    (`dual_path.optimization.build_optimizer`) in one tf.function, on fixed in-memory random
    batches, after --warmup_steps untimed steps;
(b) baseline: the image path alone, `build_image_backbone` -> Dense(num_classes) softmax, a plain
    Keras model compiled with SGD (momentum 0.9, Nesterov) and sparse categorical cross-entropy
    (jit_compile off, as the dual-path step), timed with `train_on_batch` on the same batches;
    dual_path / image_only is the cost of the text path and the shared classifier W;
(c) dual-path, stage I: the backbone frozen (`backbone.trainable = False`, its BatchNorm
    statistics too) and the instance losses only, as the trainer's stage I;
(d) the input pipeline: `dual_path.input_pipeline.train_dataset` over --shard_dir alone, then
    fed into the stage II step of a model sized by the shards' manifest (vocabulary, classes,
    caption length). pipeline / stage II must be above 1: the pipeline must not be the
    bottleneck. Skipped, with the command that builds the shards, when --shard_dir is absent.

Every figure is examples (image-caption pairs) per second.

    python -m experiments.benchmarks.train_step
    python -m experiments.benchmarks.train_step --steps=20 --batch_size=64 \\
        --output_json=experiments/results/benchmarks/train_step.json
    python -m experiments.benchmarks.train_step --backbone=ResNet50 --alpha=none --weights=none

The defaults (MobileNet alpha 0.25 at 224 px with ../shared's ImageNet weights, the paper's
text path, batch 32) take about 3 minutes on 2 CPU cores.
"""
import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from dual_path import image_path, input_pipeline, losses, optimization
from dual_path.model import DualPath, DualPathConfig, build_dual_path
from experiments.benchmarks import report

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
DEFAULT_SHARD_DIR = "workspace/flickr8k/shards/flickr8k"
BUILD_SHARDS_COMMAND = (
    "dual-path-build-shards --source_format=flickr_tokens "
    "--captions=../shared/data/flickr8k/Flickr8k_text/Flickr8k.token.txt "
    "--image_root=../shared/data/flickr8k/Flicker8k_Dataset "
    "--split_files=train=../shared/data/flickr8k/Flickr8k_text/Flickr_8k.trainImages.txt,"
    "dev=../shared/data/flickr8k/Flickr8k_text/Flickr_8k.devImages.txt "
    f"--shard_dir={DEFAULT_SHARD_DIR}"
)
# The trainer's settings (experiments/configs/flickr8k.flags); they do not change the timing.
LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
MARGIN = 1.0
IN_MEMORY_BATCHES = 4
"""Distinct random batches, used in turn."""
STEP_KEYS = ("image", "token_ids", "label")


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _optional_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The architecture flags (DualPathConfig's fields); defaults: the Flickr8k run's model."""
    parser.add_argument("--backbone", default="MobileNet", help="keras.applications name or small_cnn")
    parser.add_argument("--alpha", type=_optional_float, default=0.25,
                        help="MobileNet width multiplier; 'none' for backbones without one")
    parser.add_argument("--weights", default=str(SHARED_WEIGHTS),
                        help="backbone weights file, 'imagenet' or 'none'; default ../shared's "
                             "MobileNet 0.25 file, random weights when it is absent")
    parser.add_argument("--image_size", type=int, default=224, help="input image side in pixels")
    parser.add_argument("--small_cnn_widths", type=_int_list, default=(32, 64, 128, 256))
    parser.add_argument("--embedding_dim", type=int, default=300, help="word vector size")
    parser.add_argument("--text_blocks", type=_int_list, default=(3, 4, 6, 1))
    parser.add_argument("--text_widths", type=_int_list, default=(256, 512, 1024, 2048))
    parser.add_argument("--head_dims", type=_int_list, default=(2048, 2048))
    parser.add_argument("--dropout", type=float, default=0.75)


def resolve_weights(value: str, parser: argparse.ArgumentParser) -> str | None:
    """The backbone weights DualPathConfig takes; the default file falls back to None, said aloud."""
    if value.lower() in ("none", ""):
        return None
    if value == image_path.IMAGENET or os.path.isfile(value):
        return value
    if value == str(SHARED_WEIGHTS):
        print(f"note: {value} is absent: the backbone has random weights (weights=None)")
        return None
    parser.error(f"--weights: {value} does not exist")


def model_config(args: argparse.Namespace, *, vocab_size: int, num_classes: int,
                 max_length: int) -> DualPathConfig:
    """The DualPathConfig of the architecture flags (args.weights already resolved)."""
    return DualPathConfig(
        vocab_size=vocab_size, num_classes=num_classes, max_length=max_length,
        backbone=args.backbone, weights=args.weights, image_size=args.image_size, alpha=args.alpha,
        small_cnn_widths=args.small_cnn_widths, embedding_dim=args.embedding_dim,
        text_blocks=args.text_blocks, text_widths=args.text_widths, head_dims=args.head_dims,
        dropout=args.dropout)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--num_classes", type=int, default=6000, help="instance classes (a, b, c)")
    parser.add_argument("--vocab_size", type=int, default=7377, help="token ids (a, c)")
    parser.add_argument("--max_length", type=int, default=32, help="token ids per caption (a, c)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps (tracing included)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--shard_dir", default=DEFAULT_SHARD_DIR, help="shards for (d)")
    parser.add_argument("--pipeline_warmup_batches", type=int, default=3)
    parser.add_argument("--pipeline_batches", type=int, default=30, help="timed pipeline batches alone")
    parser.add_argument("--seed", type=int, default=0)
    report.add_output_argument(parser)
    args = parser.parse_args()
    for name in ("image_size", "embedding_dim", "num_classes", "vocab_size", "max_length",
                 "batch_size", "warmup_steps", "steps", "pipeline_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.pipeline_warmup_batches < 0:
        parser.error("--pipeline_warmup_batches must be >= 0")
    args.weights = resolve_weights(args.weights, parser)
    return args


def random_batches(config: DualPathConfig, batch_size: int, count: int, seed: int) -> list[dict]:
    """count batches of random training inputs, as tensors on the default device.

    Each: "image" float32 [B, S, S, 3] uniform in 0..255; "token_ids" int32 [B, L], a random
    length in 1..L of ids in [2, vocab_size) from slot 0, then padding; "label" int32 [B] in
    [0, num_classes).
    """
    rng = np.random.default_rng(seed)
    size, length = config.image_size, config.max_length
    batches = []
    for _ in range(count):
        lengths = rng.integers(1, length + 1, batch_size)
        token_ids = rng.integers(2, max(config.vocab_size, 3), (batch_size, length))
        token_ids[np.arange(length)[np.newaxis, :] >= lengths[:, np.newaxis]] = 0
        batches.append({
            "image": tf.constant(rng.uniform(0.0, 255.0, (batch_size, size, size, 3)), tf.float32),
            "token_ids": tf.constant(token_ids, tf.int32),
            "label": tf.constant(rng.integers(0, config.num_classes, batch_size), tf.int32),
        })
    return batches


def dual_path_step(model: DualPath, ranking: bool) -> Callable[[dict], tf.Tensor]:
    """One training step of the model's trainable variables, as the trainer's on one replica.

    Returns a tf.function: {"image", "token_ids", "label"} batch -> float32 scalar loss
    (image + text instance losses, plus the hardest-negative ranking loss when `ranking`).
    Freeze parts (backbone.trainable) before calling this: the variables are fixed here.
    """
    network = model.training_model
    variables = network.trainable_variables
    optimizer = optimization.build_optimizer(
        LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
        lr_multipliers=model.lr_multipliers(), loss_scaling=False)
    optimizer.build(variables)

    @tf.function
    def step(batch):
        with tf.GradientTape() as tape:
            outputs = network({"image": batch["image"], "token_ids": batch["token_ids"]}, training=True)
            loss = (losses.instance_loss(outputs["image_logits"], batch["label"])
                    + losses.instance_loss(outputs["text_logits"], batch["label"]))
            if ranking:
                loss += losses.ranking_loss(outputs["image_embedding"], outputs["text_embedding"],
                                            margin=MARGIN, hardest_negative=True, labels=batch["label"])
        gradients = [tf.convert_to_tensor(gradient) for gradient in tape.gradient(loss, variables)]
        optimizer.apply(gradients, variables)
        return loss

    return step


def image_only_classifier(config: DualPathConfig) -> keras.Model:
    """The baseline: the same backbone -> Dense(num_classes, softmax), compiled for train_on_batch."""
    backbone = image_path.build_image_backbone(config.backbone, config.weights, config.image_size,
                                               config.alpha, config.small_cnn_widths)
    images = keras.Input(shape=(config.image_size, config.image_size, 3), dtype="float32", name="image")
    probabilities = keras.layers.Dense(config.num_classes, activation="softmax",
                                       name="classifier")(backbone(images))
    classifier = keras.Model(images, probabilities, name="image_only")
    classifier.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM, nesterov=True),
        loss="sparse_categorical_crossentropy", jit_compile=False)
    return classifier


def time_steps(run_step: Callable[[int], object], warmup: int, steps: int) -> float:
    """Seconds of `steps` calls run_step(i) after `warmup` untimed ones.

    run_step returns a tensor (or number) that is read back after the last call only, so the
    time covers all the device's work without a sync per step.
    """
    for index in range(warmup):
        np.asarray(run_step(index))
    start = time.perf_counter()
    result = None
    for index in range(steps):
        result = run_step(warmup + index)
    np.asarray(result)
    return time.perf_counter() - start


def time_pipeline(batches, warmup: int, count: int) -> float:
    """Seconds to draw `count` batches from an iterator after `warmup` untimed ones."""
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)["image"].numpy()
    return time.perf_counter() - start


def load_manifest_or_explain(shard_dir: str, consequence: str) -> dict | None:
    """The shards' manifest, or None after printing the consequence and how to build them."""
    try:
        return input_pipeline.load_manifest(shard_dir)
    except FileNotFoundError:
        print(f"note: {shard_dir} holds no shards: {consequence}. Build them with\n  {BUILD_SHARDS_COMMAND}")
        return None


def time_input_pipeline(args: argparse.Namespace, config: DualPathConfig, manifest: dict,
                        stage2: Callable[[dict], tf.Tensor]) -> dict:
    """(d): {"input_pipeline_examples_per_s", "pipeline_fed_stage2_examples_per_s"}.

    The fed step is `stage2` when the manifest's vocabulary, classes and caption length are the
    config's, else the stage II step of a model built with the manifest's.
    """
    shard_config = dataclasses.replace(config, vocab_size=manifest["vocab_size"],
                                       num_classes=manifest["num_classes"],
                                       max_length=manifest["max_length"])
    batch = args.batch_size
    pipeline = input_pipeline.train_dataset(
        args.shard_dir, batch_size=batch, image_size=config.image_size,
        max_length=shard_config.max_length, seed=args.seed)
    alone = time_pipeline(iter(pipeline), args.pipeline_warmup_batches, args.pipeline_batches)
    if shard_config == config:
        fed_step = stage2
    else:
        print(f"note: the fed step's model takes the manifest's vocab_size {shard_config.vocab_size}, "
              f"num_classes {shard_config.num_classes}, max_length {shard_config.max_length}")
        fed_step = dual_path_step(build_dual_path(shard_config), ranking=True)
    fed_batches = iter(pipeline)
    fed = time_steps(
        lambda _: fed_step({key: value for key, value in next(fed_batches).items() if key in STEP_KEYS}),
        args.warmup_steps, args.steps)
    return {"input_pipeline_examples_per_s": batch * args.pipeline_batches / alone,
            "pipeline_fed_stage2_examples_per_s": batch * args.steps / fed}


def _parameters(variables: Sequence[tf.Variable]) -> int:
    return int(sum(np.prod(variable.shape) for variable in variables))


def _row(name: str, examples_per_s: float, ratio_text: str = "") -> str:
    return f"{name:<66}{examples_per_s:>12.1f}  {ratio_text}"


def main() -> None:
    args = _parse_args()
    config = model_config(args, vocab_size=args.vocab_size, num_classes=args.num_classes,
                          max_length=args.max_length)
    batch, warmup, steps = args.batch_size, args.warmup_steps, args.steps
    examples = batch * steps
    batches = random_batches(config, batch, IN_MEMORY_BATCHES, args.seed)

    def in_memory(step):
        return lambda index: step(batches[index % IN_MEMORY_BATCHES])

    model = build_dual_path(config)
    dual_path_parameters = _parameters(model.training_model.trainable_variables)
    stage2 = dual_path_step(model, ranking=True)
    figures = {"dual_path_stage2_examples_per_s": examples / time_steps(in_memory(stage2), warmup, steps)}

    classifier = image_only_classifier(config)
    figures["image_only_examples_per_s"] = examples / time_steps(
        lambda index: classifier.train_on_batch(batches[index % IN_MEMORY_BATCHES]["image"],
                                                batches[index % IN_MEMORY_BATCHES]["label"]),
        warmup, steps)

    manifest = load_manifest_or_explain(args.shard_dir, "the input pipeline (d) is not timed")
    if manifest is not None:
        figures.update(time_input_pipeline(args, config, manifest, stage2))

    model.backbone.trainable = False
    stage1 = dual_path_step(model, ranking=False)
    figures["dual_path_stage1_examples_per_s"] = examples / time_steps(in_memory(stage1), warmup, steps)

    stage2_rate = figures["dual_path_stage2_examples_per_s"]
    ratios = {
        "dual_path_stage2_over_image_only": stage2_rate / figures["image_only_examples_per_s"],
        "dual_path_stage1_over_stage2": figures["dual_path_stage1_examples_per_s"] / stage2_rate,
    }
    if manifest is not None:
        ratios["input_pipeline_over_dual_path_stage2"] = figures["input_pipeline_examples_per_s"] / stage2_rate
        ratios["pipeline_fed_over_in_memory_stage2"] = figures["pipeline_fed_stage2_examples_per_s"] / stage2_rate

    print(f"\n{report.describe(report.machine())}")
    print(f"{config.backbone} (alpha {config.alpha}, weights {config.weights}) at {config.image_size} px, "
          f"text blocks {config.text_blocks} widths {config.text_widths}, head {config.head_dims}, "
          f"{config.num_classes} classes, vocabulary {config.vocab_size}, L {config.max_length}; "
          f"batch {batch}, {steps} timed steps after {warmup}; "
          f"{dual_path_parameters:,} trainable dual-path parameters")
    print(f"{'':<66}{'examples/s':>12}  ratio")
    print(_row("(a) dual-path stage II step: both instance losses + ranking loss", stage2_rate))
    print(_row("(b) image path alone + Dense softmax, Keras train_on_batch",
               figures["image_only_examples_per_s"],
               f"(a)/(b) {ratios['dual_path_stage2_over_image_only']:.2f}"))
    print(_row("(c) dual-path stage I step: backbone frozen, instance losses",
               figures["dual_path_stage1_examples_per_s"],
               f"(c)/(a) {ratios['dual_path_stage1_over_stage2']:.2f}"))
    if manifest is not None:
        print(_row(f"(d) train_dataset alone over {args.shard_dir}", figures["input_pipeline_examples_per_s"],
                   f"(d)/(a) {ratios['input_pipeline_over_dual_path_stage2']:.2f}"))
        print(_row("    train_dataset fed into the stage II step", figures["pipeline_fed_stage2_examples_per_s"],
                   f"fed/(a) {ratios['pipeline_fed_over_in_memory_stage2']:.2f}"))
        if ratios["input_pipeline_over_dual_path_stage2"] <= 1.0:
            print("WARNING: the input pipeline is slower than the train step: it is the bottleneck")

    if args.output_json:
        settings = {**vars(args), "dual_path_trainable_parameters": dual_path_parameters,
                    "learning_rate": LEARNING_RATE, "margin": MARGIN}
        report.write_report(args.output_json, "train_step", figures, ratios, settings)


if __name__ == "__main__":
    main()
