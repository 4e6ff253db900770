"""Times the trainer's training step against an image-only classifier (run by hand, not a test).

The dual-path figures time the step the trainer runs, `Trainer.make_train_step` of a
`dual_path.training.Trainer` built on --shard_dir (the model's vocabulary, classes and caption
length come from the shards' manifest; without shards nothing is timed and the script says how
to build them). Each dual-path variant gets its own step counter, lr schedule and optimizer
(the MatConvNet SGD update) from `Trainer.prepare_stage`, as `Trainer.run_stage` does, and runs
--warmup_steps untimed steps before --steps timed ones. "In memory" means one random batch (images uniform in
0..255, random captions and labels) fed to the step again and again through a tf.data iterator,
as the trainer feeds its pipeline's. In one run, at the same batch size and image size, on this
machine's CPU or GPU:

(a) stage II in memory: the whole model trainable (the backbone at lr x0.1), loss weights
    1:1:1 (ranking loss and both instance losses);
(b) baseline: the image path alone, `build_image_backbone` -> Dense(num_classes) softmax, a plain
    Keras model compiled with SGD (momentum 0.9, Nesterov) and sparse categorical cross-entropy
    (jit_compile off, as the dual-path step), timed with `train_on_batch` on the same batch;
    (a)/(b) is the cost of the text path and the shared classifier W;
(c) stage I on images in memory: the backbone frozen (`backbone.trainable = False`, its
    BatchNorm statistics too), loss weights --stage1_loss_weights, the batch's images run
    through the frozen backbone every step;
(d) the input pipeline: `dual_path.input_pipeline.train_dataset` over --shard_dir alone, then
    fed into the stage II step of (a). pipeline / stage II must be above 1: the pipeline must
    not be the bottleneck;
(e) stage I on cached features in memory: `StageConfig(feature_views=8, train_backbone=False)`,
    the step on {"image_features": float32 [B, F], the frozen backbone's features of the
    batch's images (F = the backbone's output size), "token_ids", "label"}, as the trainer
    feeds it from `dual_path.feature_cache` (the cache's one-off cost is not included);
    (e)/(c) is the speed-up of the feature cache;
(f) the trainer's loop: `Trainer.make_train_loop`, what `Trainer.run_stage` trains with, in
    calls of TrainConfig.steps_per_loop steps (fewer when --steps is smaller), the step's
    values averaged on the device, the host reading the loop's finiteness and the step after
    each call as run_stage does; on the batches of (e) and of (a). (f)/(e) and (f)/(a) are the
    loop's cost next to the bare step, which is read back after its last step only.

Every figure is examples (image-caption pairs) per second.

The architecture flags default to the model of experiments/configs/flickr8k.flags: MobileNetV2
1.0 at 224 px with ../shared's ImageNet weights, 50-d word vectors (GloVe's), a text CNN of one bottleneck block per
stage (--text_blocks=1,1,1,1) at half the paper's widths (--text_widths=128,256,512,1024) and
1024-d heads (--head_dims=1024,1024); the paper's model is --text_blocks=3,4,6,1
--text_widths=256,512,1024,2048 --head_dims=2048,2048. The other trainer settings (lr,
momentum, weight decay, margin, loss over all negatives) are flickr8k.flags'; they do not change
the timing.

    python -m experiments.benchmarks.train_step
    python -m experiments.benchmarks.train_step --steps=20 --batch_size=64 \\
        --output_json=experiments/results/benchmarks/train_step.json
    python -m experiments.benchmarks.train_step --text_blocks=3,4,6,1 \\
        --text_widths=256,512,1024,2048 --head_dims=2048,2048
    python -m experiments.benchmarks.train_step --backbone=ResNet50 --alpha=none --weights=none

With the defaults it runs four dual-path steps, two loops and the baseline 13 times each and draws 33
pipeline batches: minutes on 2 CPU cores.
"""
import argparse
import dataclasses
import os
import sys
import tempfile
import time
from typing import Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from dual_path import image_path, input_pipeline, training
from dual_path.model import DualPathConfig
from experiments.benchmarks import report

SHARED_WEIGHTS = report.SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.weights.h5"
DEFAULT_SHARD_DIR = "workspace/flickr8k/shards/flickr8k_glove"
BUILD_SHARDS_COMMAND = (
    "dual-path-build-shards --source_format=flickr_tokens "
    "--captions=../shared/data/flickr8k/Flickr8k_text/Flickr8k.token.txt "
    "--image_root=../shared/data/flickr8k/Flicker8k_Dataset "
    "--split_files=train=../shared/data/flickr8k/Flickr8k_text/Flickr_8k.trainImages.txt,"
    "dev=../shared/data/flickr8k/Flickr8k_text/Flickr_8k.devImages.txt "
    "--word2vec=../shared/vectors/glove.6B.50d.top100k.txt "
    f"--shard_dir={DEFAULT_SHARD_DIR}"
)
# The trainer's settings (experiments/configs/flickr8k.flags); they do not change the timing.
LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
MARGIN = 0.2
HARDEST_NEGATIVE = False
STAGE2_BACKBONE_LR_MULTIPLIER = 0.1
STAGE2_LOSS_WEIGHTS = training.LossWeights(rank=1.0, image=1.0, text=1.0)
FEATURE_VIEWS = 8
"""Cached augmented views per image of (e); the step's cost does not depend on it."""


def int_list(value: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers ("1,2,3") -> (1, 2, 3)."""
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _optional_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _loss_weights(value: str) -> str:
    try:
        training.LossWeights.parse(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The architecture flags (DualPathConfig's fields); defaults: the Flickr8k run's model
    (experiments/configs/flickr8k.flags)."""
    parser.add_argument("--backbone", default="MobileNetV2", help="keras.applications name or small_cnn")
    parser.add_argument("--alpha", type=_optional_float, default=None,
                        help="MobileNet width multiplier; 'none' for backbones without one")
    parser.add_argument("--weights", default=str(SHARED_WEIGHTS),
                        help="backbone weights file, 'imagenet' or 'none'; default ../shared's "
                             "MobileNetV2 file, random weights when it is absent")
    parser.add_argument("--image_size", type=int, default=224, help="input image side in pixels")
    parser.add_argument("--small_cnn_widths", type=int_list, default=(32, 64, 128, 256))
    parser.add_argument("--embedding_dim", type=int, default=50, help="word vector size")
    parser.add_argument("--text_blocks", type=int_list, default=(1, 1, 1, 1),
                        help="bottleneck blocks per text CNN stage (the paper: 3,4,6,1)")
    parser.add_argument("--text_widths", type=int_list, default=(128, 256, 512, 1024),
                        help="text CNN stage widths; the paper's: 256,512,1024,2048")
    parser.add_argument("--head_dims", type=int_list, default=(1024, 1024),
                        help="fc sizes of each path's head; the paper's: 2048,2048")
    parser.add_argument("--dropout", type=float, default=0.0)


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
    parser.add_argument("--stage1_loss_weights", type=_loss_weights, default="1:1:1",
                        help="rank:image:text of (c) and (e); the paper's stage I: 0:1:1")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps (tracing included)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--shard_dir", default=DEFAULT_SHARD_DIR,
                        help="shards: the model's sizes (manifest.json) and the pipeline of (d)")
    parser.add_argument("--pipeline_warmup_batches", type=int, default=3)
    parser.add_argument("--pipeline_batches", type=int, default=30, help="timed pipeline batches alone")
    parser.add_argument("--seed", type=int, default=0)
    report.add_output_argument(parser)
    args = parser.parse_args()
    for name in ("image_size", "embedding_dim", "batch_size", "warmup_steps", "steps", "pipeline_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.pipeline_warmup_batches < 0:
        parser.error("--pipeline_warmup_batches must be >= 0")
    args.weights = resolve_weights(args.weights, parser)
    return args


def random_batch(config: DualPathConfig, batch_size: int, seed: int) -> dict:
    """One batch of random training inputs, as tensors.

    "image" float32 [B, S, S, 3] uniform in 0..255; "token_ids" int32 [B, L], a random length in
    1..L of ids in [2, vocab_size) from slot 0, then padding; "label" int32 [B] in [0, num_classes).
    """
    rng = np.random.default_rng(seed)
    size, length = config.image_size, config.max_length
    lengths = rng.integers(1, length + 1, batch_size)
    token_ids = rng.integers(2, max(config.vocab_size, 3), (batch_size, length))
    token_ids[np.arange(length)[np.newaxis, :] >= lengths[:, np.newaxis]] = 0
    return {
        "image": tf.constant(rng.uniform(0.0, 255.0, (batch_size, size, size, 3)), tf.float32),
        "token_ids": tf.constant(token_ids, tf.int32),
        "label": tf.constant(rng.integers(0, config.num_classes, batch_size), tf.int32),
    }


def repeated(trainer: training.Trainer, batch: dict) -> Iterator:
    """An iterator of `batch` forever, distributed by the trainer's strategy as its pipeline is."""
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    return iter(trainer.strategy.experimental_distribute_dataset(dataset))


def trainer_step(trainer: training.Trainer, stage: training.StageConfig) -> Callable[[Iterator], dict]:
    """`trainer.make_train_step` of `stage`, with a fresh step counter, schedule and optimizer.

    `Trainer.prepare_stage` freezes or unfreezes the backbone as the stage says; the returned
    step must be traced (called first) before the backbone's state changes again.
    """
    schedule, step, optimizer = trainer.prepare_stage(stage)
    return trainer.make_train_step(stage, optimizer, schedule, step)


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


def time_trainer_step(step: Callable[[Iterator], dict], batches: Iterator, warmup: int,
                      steps: int) -> float:
    """Seconds of `steps` trainer steps on `batches` after `warmup` untimed ones."""
    return time_steps(lambda _: step(batches)["loss"], warmup, steps)


def time_trainer_loop(trainer: training.Trainer, stage: training.StageConfig, batches: Iterator,
                      warmup: int, steps: int) -> float:
    """Seconds of `steps` steps of the trainer's loop (`Trainer.make_train_loop` of `stage`, with
    a fresh step counter, schedule and optimizer) on `batches`, after `warmup` untimed steps."""
    schedule, step, optimizer = trainer.prepare_stage(stage)
    train_loop, _, _ = trainer.make_train_loop(stage, optimizer, schedule, step)

    def run(count: int) -> None:
        while count > 0:
            num_steps = min(trainer.config.steps_per_loop, count)
            finite, _ = train_loop(batches, tf.constant(num_steps, tf.int32))
            if not bool(finite) or int(step.numpy()) < 0:
                raise RuntimeError("a benchmark step's loss is not finite")
            count -= num_steps

    run(warmup)
    start = time.perf_counter()
    run(steps)
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


def time_input_pipeline(args: argparse.Namespace, trainer: training.Trainer,
                        stage2: Callable[[Iterator], dict]) -> dict:
    """(d): {"input_pipeline_examples_per_s", "pipeline_fed_stage2_examples_per_s"}.

    The pipeline is the trainer's for a stage on images (`input_pipeline.train_dataset` with
    its batch size, image size, caption length and augmentation); the fed step is `stage2`.
    """
    config = trainer.config
    pipeline = input_pipeline.train_dataset(
        config.shard_dir, batch_size=config.batch_size, image_size=config.model.image_size,
        max_length=config.model.max_length, seed=config.seed, flip=config.flip,
        position_shift=config.position_shift)
    alone = time_pipeline(iter(pipeline), args.pipeline_warmup_batches, args.pipeline_batches)
    fed_batches = iter(trainer.strategy.experimental_distribute_dataset(pipeline))
    fed = time_trainer_step(stage2, fed_batches, args.warmup_steps, args.steps)
    return {"input_pipeline_examples_per_s": config.batch_size * args.pipeline_batches / alone,
            "pipeline_fed_stage2_examples_per_s": config.batch_size * args.steps / fed}


def _parameters(variables: Sequence[tf.Variable]) -> int:
    return int(sum(np.prod(variable.shape) for variable in variables))


def _row(name: str, examples_per_s: float, ratio_text: str = "") -> str:
    return f"{name:<66}{examples_per_s:>12.1f}  {ratio_text}"


def main() -> None:
    args = _parse_args()
    manifest = load_manifest_or_explain(args.shard_dir, "nothing is timed (the trainer needs them)")
    if manifest is None:
        sys.exit(1)
    keras.utils.set_random_seed(args.seed)
    config = model_config(args, vocab_size=manifest["vocab_size"], num_classes=manifest["num_classes"],
                          max_length=manifest["max_length"])
    stage2 = training.StageConfig(
        stage=2, epochs=1, lr_values=(LEARNING_RATE,), lr_boundaries=(),
        loss_weights=STAGE2_LOSS_WEIGHTS, train_backbone=True,
        backbone_lr_multiplier=STAGE2_BACKBONE_LR_MULTIPLIER)
    stage1_images = training.StageConfig(
        stage=1, epochs=1, lr_values=(LEARNING_RATE,), lr_boundaries=(),
        loss_weights=training.LossWeights.parse(args.stage1_loss_weights), train_backbone=False)
    stage1_features = dataclasses.replace(stage1_images, feature_views=FEATURE_VIEWS)
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = training.Trainer(training.TrainConfig(
            model_dir=model_dir, shard_dir=args.shard_dir, model=config,
            stages=(stage1_images, stage2), batch_size=args.batch_size, seed=args.seed,
            margin=MARGIN, hardest_negative=HARDEST_NEGATIVE, momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY, word_embedding_init="random"))
    batch, warmup, steps = args.batch_size, args.warmup_steps, args.steps
    examples = batch * steps
    images_batch = random_batch(config, batch, args.seed)
    features_batch = {"image_features": trainer.model.backbone(images_batch["image"], training=False),
                      "token_ids": images_batch["token_ids"], "label": images_batch["label"]}

    # Stage II is timed first, fed too, while the backbone is trainable: a step is traced
    # with the backbone's state at its first call.
    stage2_step = trainer_step(trainer, stage2)
    dual_path_parameters = _parameters(trainer.model.training_model.trainable_variables)
    figures = {"dual_path_stage2_examples_per_s":
               examples / time_trainer_step(stage2_step, repeated(trainer, images_batch), warmup, steps)}
    figures.update(time_input_pipeline(args, trainer, stage2_step))

    classifier = image_only_classifier(config)
    figures["image_only_examples_per_s"] = examples / time_steps(
        lambda _: classifier.train_on_batch(images_batch["image"], images_batch["label"]), warmup, steps)

    stage1_images_step = trainer_step(trainer, stage1_images)
    figures["dual_path_stage1_images_examples_per_s"] = examples / time_trainer_step(
        stage1_images_step, repeated(trainer, images_batch), warmup, steps)
    stage1_features_step = trainer_step(trainer, stage1_features)
    figures["dual_path_stage1_features_examples_per_s"] = examples / time_trainer_step(
        stage1_features_step, repeated(trainer, features_batch), warmup, steps)

    figures["trainer_loop_stage1_features_examples_per_s"] = examples / time_trainer_loop(
        trainer, stage1_features, repeated(trainer, features_batch), warmup, steps)
    figures["trainer_loop_stage2_examples_per_s"] = examples / time_trainer_loop(
        trainer, stage2, repeated(trainer, images_batch), warmup, steps)

    stage2_rate = figures["dual_path_stage2_examples_per_s"]
    stage1_images_rate = figures["dual_path_stage1_images_examples_per_s"]
    ratios = {
        "dual_path_stage2_over_image_only": stage2_rate / figures["image_only_examples_per_s"],
        "dual_path_stage1_images_over_stage2": stage1_images_rate / stage2_rate,
        "dual_path_stage1_features_over_images":
            figures["dual_path_stage1_features_examples_per_s"] / stage1_images_rate,
        "input_pipeline_over_dual_path_stage2": figures["input_pipeline_examples_per_s"] / stage2_rate,
        "pipeline_fed_over_in_memory_stage2": figures["pipeline_fed_stage2_examples_per_s"] / stage2_rate,
        "trainer_loop_over_step_stage1_features":
            figures["trainer_loop_stage1_features_examples_per_s"]
            / figures["dual_path_stage1_features_examples_per_s"],
        "trainer_loop_over_step_stage2": figures["trainer_loop_stage2_examples_per_s"] / stage2_rate,
    }

    print(f"\n{report.describe(report.machine())}")
    print(f"{config.backbone} (alpha {config.alpha}, weights {config.weights}) at {config.image_size} px "
          f"({features_batch['image_features'].shape[-1]}-d features), text blocks {config.text_blocks} "
          f"widths {config.text_widths}, head {config.head_dims}, {config.num_classes} classes, "
          f"vocabulary {config.vocab_size}, L {config.max_length} (from {args.shard_dir}); "
          f"stage I loss weights {args.stage1_loss_weights}; batch {batch}, "
          f"{steps} timed steps after {warmup}; "
          f"{dual_path_parameters:,} trainable dual-path parameters in stage II")
    print(f"{'':<66}{'examples/s':>12}  ratio")
    print(_row("(a) trainer's stage II step: ranking + both instance losses", stage2_rate))
    print(_row("(b) image path alone + Dense softmax, Keras train_on_batch",
               figures["image_only_examples_per_s"],
               f"(a)/(b) {ratios['dual_path_stage2_over_image_only']:.2f}"))
    print(_row("(c) trainer's stage I step on images through the frozen backbone",
               stage1_images_rate, f"(c)/(a) {ratios['dual_path_stage1_images_over_stage2']:.2f}"))
    print(_row(f"(d) train_dataset alone over {args.shard_dir}", figures["input_pipeline_examples_per_s"],
               f"(d)/(a) {ratios['input_pipeline_over_dual_path_stage2']:.2f}"))
    print(_row("    train_dataset fed into the stage II step", figures["pipeline_fed_stage2_examples_per_s"],
               f"fed/(a) {ratios['pipeline_fed_over_in_memory_stage2']:.2f}"))
    print(_row("(e) trainer's stage I step on cached backbone features",
               figures["dual_path_stage1_features_examples_per_s"],
               f"(e)/(c) {ratios['dual_path_stage1_features_over_images']:.2f}"))
    print(_row(f"(f) trainer's loop ({trainer.config.steps_per_loop} steps a call) on (e)'s batches",
               figures["trainer_loop_stage1_features_examples_per_s"],
               f"(f)/(e) {ratios['trainer_loop_over_step_stage1_features']:.2f}"))
    print(_row("    trainer's loop on (a)'s batches", figures["trainer_loop_stage2_examples_per_s"],
               f"(f)/(a) {ratios['trainer_loop_over_step_stage2']:.2f}"))
    if ratios["input_pipeline_over_dual_path_stage2"] <= 1.0:
        print("WARNING: the input pipeline is slower than the train step: it is the bottleneck")

    if args.output_json:
        settings = {**vars(args), "vocab_size": config.vocab_size, "num_classes": config.num_classes,
                    "max_length": config.max_length, "dual_path_trainable_parameters": dual_path_parameters,
                    "learning_rate": LEARNING_RATE, "margin": MARGIN, "hardest_negative": HARDEST_NEGATIVE,
                    "stage2_backbone_lr_multiplier": STAGE2_BACKBONE_LR_MULTIPLIER,
                    "feature_views": FEATURE_VIEWS, "steps_per_loop": trainer.config.steps_per_loop}
        report.write_report(args.output_json, "train_step", figures, ratios, settings)


if __name__ == "__main__":
    main()
