"""Times the trainer's training step against an image-only classifier (run by hand, not a test).

The dual-path figures time the step the trainer runs, `Trainer.make_train_step` of a
`dual_path.training.Trainer` built on --shard_dir (the model's vocabulary, classes and caption
length come from the shards' manifest; without shards nothing is timed and the script says how
to build them). Each dual-path variant gets its own step counter, lr schedule and optimizer
(the MatConvNet SGD update) from `Trainer.prepare_stage`, as `Trainer.run_stage` does, and runs
--warmup_steps untimed steps before --steps timed ones. "In memory" means one random batch (images uniform in
0..255, random captions and labels) fed to the step again and again through a tf.data iterator,
as the trainer feeds its pipeline's. In one run, at the same batch size (--batch_size; a stage's
own, --stage2_batch_size, is set aside) and image size, on this machine's CPU or GPU:

(a) stage II in memory: the whole model trainable (the backbone at the config's stage II lr
    multiplier, all of it even where the config fine-tunes only its top: see
    backbone_finetune.py), the config's stage II loss weights;
(b) baseline: the image path alone, `build_image_backbone` -> Dense(num_classes) softmax, a plain
    Keras model compiled with SGD (Nesterov) and sparse categorical cross-entropy at the
    stage II lr and momentum (jit_compile off, as the dual-path step), timed with
    `train_on_batch` on the same batch;
    (a)/(b) is the cost of the text path and the shared classifier W;
(c) stage I on images in memory: the backbone frozen (`backbone.trainable = False`, its
    BatchNorm statistics too), the config's stage I loss weights, the batch's images run
    through the frozen backbone every step;
(d) the input pipeline: `dual_path.input_pipeline.train_dataset` over --shard_dir alone, then
    fed into the stage II step of (a). pipeline / stage II must be above 1: the pipeline must
    not be the bottleneck;
(e) stage I on cached features in memory: the config's stage I with its feature_views,
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

The model and the trainer's settings are those of a training flagfile, --config (default
experiments/configs/flickr8k.flags: MobileNetV2 1.0 at 224 px with ../shared's ImageNet weights,
random weights where the file is absent; 50-d word vectors, GloVe's; a text CNN of one
bottleneck block per stage at half the paper's widths; 1024-d heads), read through the same
flags as the training command (experiments/config_flags.py): any of them given here overrides
it. Each step runs at its stage's first learning rate; the word embedding starts random.

    python -m experiments.benchmarks.train_step
    python -m experiments.benchmarks.train_step --steps=20 --batch_size=64 \\
        --output_json=experiments/results/benchmarks/train_step.json
    python -m experiments.benchmarks.train_step --text_blocks=3,4,6,1 \\
        --text_widths=256,512,1024,2048 --head_dims=2048,2048
    python -m experiments.benchmarks.train_step --backbone=ResNet50 --alpha=none --weights=none
    python -m experiments.benchmarks.train_step --config=experiments/configs/flickr30k.flags \\
        --shard_dir=workspace/flickr30k/shards/flickr30k

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
from absl import flags

from data_prep import shared_data
from dual_path import image_path, input_pipeline, training
from dual_path.config import STAGES, DualPathConfig, StageConfig, TrainConfig, to_dict
from experiments import config_flags
from experiments.benchmarks import report

DEFAULT_SHARD_DIR = "workspace/flickr8k/shards/flickr8k_glove"
BUILD_SHARDS_COMMAND = shared_data.flickr8k_build_command(DEFAULT_SHARD_DIR)
DEFAULT_CONFIG = "experiments/configs/flickr8k.flags"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config: the training run whose model and settings a benchmark times. Every other
    --name=value on the command line is one of that training command's flags
    (experiments/config_flags.py) and overrides the flagfile; --shard_dir defaults to
    DEFAULT_SHARD_DIR."""
    parser.add_argument("--config", action="append", metavar="FLAGFILE",
                        help=f"training flagfile (repeatable, in order); default {DEFAULT_CONFIG}. "
                             "Any training flag overrides it, e.g. --text_blocks=3,4,6,1")


def parse_config_flags(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, flags.FlagValues]:
    """The benchmark's own arguments, and the training flags of --config and the overrides."""
    args, overrides = parser.parse_known_args()
    try:
        flag_values = config_flags.parse_flagfiles(
            args.config or [DEFAULT_CONFIG], [f"--shard_dir={DEFAULT_SHARD_DIR}", *overrides])
    except flags.Error as error:
        parser.error(str(error))
    return args, flag_values


def runnable_weights(weights: str | None) -> str | None:
    """The backbone weights to build with: a weights file that is absent (../shared's, on a
    machine without it) falls back to random weights, said aloud."""
    if weights in (None, image_path.IMAGENET) or os.path.isfile(weights):
        return weights
    print(f"note: {weights} is absent: the backbone has random weights (weights=None)")
    return None


def _parse_args() -> tuple[argparse.Namespace, flags.FlagValues]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps (tracing included)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--pipeline_warmup_batches", type=int, default=3)
    parser.add_argument("--pipeline_batches", type=int, default=30, help="timed pipeline batches alone")
    report.add_output_argument(parser)
    args, flag_values = parse_config_flags(parser)
    for name in ("warmup_steps", "steps", "pipeline_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.pipeline_warmup_batches < 0:
        parser.error("--pipeline_warmup_batches must be >= 0")
    return args, flag_values


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


def trainer_step(trainer: training.Trainer, stage: StageConfig) -> Callable[[Iterator], dict]:
    """`trainer.make_train_step` of `stage`, with a fresh step counter, schedule and optimizer.

    `Trainer.prepare_stage` freezes or unfreezes the backbone as the stage says; the returned
    step must be traced (called first) before the backbone's state changes again.
    """
    schedule, step, optimizer = trainer.prepare_stage(stage)
    return trainer.make_train_step(stage, optimizer, schedule, step)


def image_only_classifier(config: DualPathConfig, learning_rate: float, momentum: float) -> keras.Model:
    """The baseline: the same backbone -> Dense(num_classes, softmax), compiled for train_on_batch
    with Keras SGD (Nesterov) at the trainer's learning rate and momentum."""
    backbone = image_path.build_image_backbone(config.backbone, config.weights, config.image_size,
                                               config.alpha, config.small_cnn_widths)
    images = keras.Input(shape=(config.image_size, config.image_size, 3), dtype="float32", name="image")
    probabilities = keras.layers.Dense(config.num_classes, activation="softmax",
                                       name="classifier")(backbone(images))
    classifier = keras.Model(images, probabilities, name="image_only")
    classifier.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=True),
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


def time_trainer_loop(trainer: training.Trainer, stage: StageConfig, batches: Iterator,
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


def benchmark_stages(tree: TrainConfig) -> tuple[StageConfig, StageConfig, StageConfig]:
    """(stage II with the whole backbone trainable, stage I on images, stage I on cached
    features) of the tree's stages, one epoch each; the trainer's lr is each stage's first.
    Stage II trains the whole backbone whatever the config's partial fine-tuning
    (backbone_finetune.py times that), so that (a)/(b) compares like with like. Every stage
    runs at the tree's --batch_size, a stage's own (--stage2_batch_size) set aside, so that
    every ratio compares one batch size."""
    stage1, stage2 = tree.stages
    stage2 = dataclasses.replace(stage2, epochs=1, lr_boundaries=(), lr_values=stage2.lr_values[:1],
                                 backbone_trainable_blocks=None, backbone_trainable_from=None,
                                 batch_size=None)
    stage1_images = dataclasses.replace(stage1, epochs=1, lr_boundaries=(),
                                        lr_values=stage1.lr_values[:1], feature_views=0,
                                        batch_size=None)
    stage1_features = dataclasses.replace(stage1_images, feature_views=stage1.feature_views or 1)
    return stage2, stage1_images, stage1_features


def main() -> None:
    args, flag_values = _parse_args()
    shard_dir = flag_values.shard_dir
    manifest = load_manifest_or_explain(shard_dir, "nothing is timed (the trainer needs them)")
    if manifest is None:
        sys.exit(1)
    with tempfile.TemporaryDirectory() as model_dir:
        flag_values.model_dir = model_dir
        try:
            tree = config_flags.train_config(flag_values, STAGES)
        except ValueError as error:
            sys.exit(f"train_step: error: {error}")
        tree = dataclasses.replace(
            tree, word_embedding_init="random",
            model=dataclasses.replace(tree.model, weights=runnable_weights(tree.model.weights)))
        keras.utils.set_random_seed(tree.seed)
        stage2, stage1_images, stage1_features = benchmark_stages(tree)
        trainer = training.Trainer(dataclasses.replace(tree, stages=(stage1_images, stage2)))
    config = tree.model
    batch, warmup, steps = tree.batch_size, args.warmup_steps, args.steps
    examples = batch * steps
    images_batch = random_batch(config, batch, tree.seed)
    features_batch = {"image_features": trainer.model.backbone(images_batch["image"], training=False),
                      "token_ids": images_batch["token_ids"], "label": images_batch["label"]}

    # Stage II is timed first, fed too, while the backbone is trainable: a step is traced
    # with the backbone's state at its first call.
    stage2_step = trainer_step(trainer, stage2)
    dual_path_parameters = _parameters(trainer.model.training_model.trainable_variables)
    figures = {"dual_path_stage2_examples_per_s":
               examples / time_trainer_step(stage2_step, repeated(trainer, images_batch), warmup, steps)}
    figures.update(time_input_pipeline(args, trainer, stage2_step))

    classifier = image_only_classifier(config, stage2.lr_values[0], tree.momentum)
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
          f"vocabulary {config.vocab_size}, L {config.max_length} (from {shard_dir}); "
          f"stage I loss weights {stage1_images.loss_weights}; batch {batch}, "
          f"{steps} timed steps after {warmup}; "
          f"{dual_path_parameters:,} trainable dual-path parameters in stage II")
    print(f"{'':<66}{'examples/s':>12}  ratio")
    print(_row("(a) trainer's stage II step: ranking + both instance losses", stage2_rate))
    print(_row("(b) image path alone + Dense softmax, Keras train_on_batch",
               figures["image_only_examples_per_s"],
               f"(a)/(b) {ratios['dual_path_stage2_over_image_only']:.2f}"))
    print(_row("(c) trainer's stage I step on images through the frozen backbone",
               stage1_images_rate, f"(c)/(a) {ratios['dual_path_stage1_images_over_stage2']:.2f}"))
    print(_row(f"(d) train_dataset alone over {shard_dir}", figures["input_pipeline_examples_per_s"],
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
        run_settings = {name: value for name, value in to_dict(tree).items()
                        if name not in ("model", "model_dir")}
        settings = {**vars(args), **to_dict(config), **run_settings,
                    "dual_path_trainable_parameters": dual_path_parameters,
                    "timed_stages": [to_dict(stage) for stage in (stage2, stage1_images, stage1_features)]}
        report.write_report(args.output_json, "train_step", figures, ratios, settings)


if __name__ == "__main__":
    main()
