"""The two-stage trainer: stage I with the backbone frozen, stage II end to end with ranking loss.

Stage I (paper Section 3.3) freezes the image backbone, its BatchNorm statistics included,
and trains the text CNN, both heads and the shared classifier W with the two instance
losses. Stage II starts from stage I's final checkpoint, unfreezes the backbone (with its
own lr multiplier) and adds the ranking loss. Each stage has its own loss weights
(rank:image:text), epochs, lr schedule and a fresh optimizer, as the original's two runs.

The instance classifier W is the paper's dense layer by default; `--classifier=cosine` and
`--classifier_init=imprint` (columns set from the image features when stage I starts fresh)
make its loss learn within CPU budgets (`dual_path.instance_classifier`). At the end of
every validation interval the trainer checks that each trained instance loss has left chance
(`dual_path.instance_health`) and warns, in the log and in TensorBoard, when it has not.

One training step (`Trainer.make_train_step`) runs under `strategy.run`: every loss follows
`dual_path.losses`' convention (sum over the replica's rows / global batch size), the
optimizer all-reduces the gradients with SUM, and the per-replica losses are reduced with
SUM, so the numbers are global-batch means for any number of replicas.

What a run writes under model_dir (see WORKSPACE.md):
  flags.txt, flags.json                  the resolved flags (written by experiments/train.py)
  stage{N}/ckpt-<step>.*                 model, optimizer, step, epoch, stage, best rsum;
                                         every epoch and every `checkpoint_every_steps`
  stage{N}/best/                         the checkpoint with the best validation rsum
  stage{N}/done                          JSON, written atomically after the stage's final
                                         checkpoint: a finished stage is never trained again
  logs/stage{N}/train, .../validation    TensorBoard: losses, accuracies, lr, steps/s,
                                         examples/s; R@K, rsum, a retrieval example; in
                                         .../validation also the projector's embeddings of
                                         the validation images and captions at the stage's
                                         end (projector_config.pbtxt, metadata.tsv,
                                         embedding-<n> with its `checkpoint` file)
  results.json                           validation (and test) metrics of the final model, and
                                         the validation rsum of every validation this process
                                         ran ("validation_curve": stage, step, epoch, rsum)

TensorBoard's step axis is the run's global step: stage I's step s is plotted at s, stage II's
at (stage I's final step) + s, so the two stages' curves follow one another. Checkpoints,
done markers and results.json count steps within their stage.

A run killed at any moment and started again with the same arguments resumes from the
last checkpoint of the unfinished stage: weights, optimizer state, step (and with it
the lr schedule), epoch, the dropout masks' random state; the data stream restarts at that
step in the same order (`input_pipeline`'s start_step), so the resumed stage trains the
batches of an uninterrupted run and ends with its weights. A non-finite loss stops the run
(NonFiniteLossError) before anything is saved, so the last checkpoint stays the last good
state.
"""
import dataclasses
import math
import os
import textwrap
import time
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dual_path import embeddings, evaluation, feature_cache, image_path, input_pipeline
from dual_path import instance_classifier
from dual_path import instance_health, losses, optimization
from dual_path import shard_format
from dual_path import run_layout
from dual_path import text
from dual_path.model import DualPath, DualPathConfig, build_dual_path

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
WORD_EMBEDDING_INITS = ("word2vec", "random")
RECALL_COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
RETRIEVAL_EXAMPLE_TOP_K = 5
METRIC_NAMES = ("loss", "rank_loss", "image_loss", "text_loss", "image_accuracy", "text_accuracy")
"""The values of one training step (`Trainer.make_train_step`), global-batch means."""
PROJECTOR_TENSOR = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
"""The projector's tensor: validation image embeddings, then their captions' (metadata.tsv order)."""
PROJECTOR_METADATA = "metadata.tsv"
_THUMBNAIL = 96
# PIL's default bitmap font: about 6 pixels a character, 11 a line.
_CHARACTER_WIDTH = 6
_LINE_HEIGHT = 14
_CAPTION_LINES = 3


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; nothing after the last good checkpoint was saved."""


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms: ranking, image instance, text instance (the paper's lambdas)."""

    rank: float
    image: float
    text: float

    @classmethod
    def parse(cls, value: str) -> "LossWeights":
        """"rank:image:text", e.g. "0:1:1" (stage I) or "2:1:0.1" (COCO stage II)."""
        parts = value.split(":")
        try:
            weights = [float(part) for part in parts]
        except ValueError:
            weights = []
        if len(weights) != 3 or any(weight < 0 or not math.isfinite(weight) for weight in weights):
            raise ValueError(f"loss weights must be 'rank:image:text' with three non-negative "
                             f"numbers, got {value!r}")
        if not any(weights):
            raise ValueError(f"loss weights {value!r} are all zero: nothing to train")
        return cls(*weights)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """What differs between the two stages."""

    stage: int
    epochs: int
    lr_values: Sequence[float]
    lr_boundaries: Sequence[float]
    """Where the next lr value starts, in `TrainConfig.lr_boundary_unit`."""
    loss_weights: LossWeights
    train_backbone: bool
    """False freezes the backbone's weights and BatchNorm statistics (stage I)."""
    backbone_lr_multiplier: float = 1.0
    """lr multiplier of the backbone's trained weights (the original's stage II: 0.02)."""
    backbone_bn_lr_multiplier: float | None = None
    """Of its BatchNormalization scales and offsets (the original's: 0.001); None: as the
    backbone's. The moving statistics of a trained BN follow Keras' momentum, not an lr."""
    first_conv_lr_multiplier: float | None = None
    """Of its first convolution's kernel (the original's: 1e-4); None: as the backbone's."""
    backbone_trainable_from: str | None = None
    """With train_backbone: train the backbone from this layer on, the rest frozen
    (image_path.train_top_of_backbone); None (and no backbone_trainable_blocks): all of it."""
    backbone_trainable_blocks: int | None = None
    """With train_backbone: train only the backbone's last this many blocks and what follows
    (0: none of it, the backbone stays frozen, BN statistics included)."""
    hardest_negative: bool | None = None
    """The stage's ranking loss on the hardest negative (True) or the sum (False); None:
    TrainConfig.hardest_negative."""
    feature_views: int = 0
    """With a frozen backbone: train on its cached features of this many augmented views per
    image (`dual_path.feature_cache`); 0 runs the backbone on freshly augmented images."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run; experiments/train.py fills it from flags."""

    model_dir: str
    shard_dir: str
    model: DualPathConfig
    stages: Sequence[StageConfig]
    batch_size: int = 32
    """Global batch size (all replicas together)."""
    seed: int = 0
    flip: str = "swap_left_right"
    """input_pipeline flip mode of the training images."""
    position_shift: bool = True
    margin: float = 1.0
    hardest_negative: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_boundary_unit: str = "epochs"
    mixed_precision: bool = False
    """mixed_float16 with dynamic loss scaling; mixed_bfloat16 on TPU."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every this many steps inside an epoch (0: at epoch ends only)."""
    keep_checkpoints: int = 3
    log_every_steps: int = 50
    steps_per_loop: int = 50
    """Training steps per tf.function call (as Orbit's steps_per_loop): the loss means stay on
    the device in between; a call also ends at every log, checkpoint and epoch boundary."""
    validation_split: str = "val"
    validate_every_epochs: int = 1
    eval_flip_images: bool = True
    eval_shift_texts: bool = False
    eval_folds: int = 1
    evaluate_test: bool = False
    test_split: str = "test"
    results_checkpoint: str = "best"
    """"best" (by validation rsum) or "last": the checkpoint of the final results."""
    projector_images: int = 500
    """Validation images (with their captions) in the end-of-stage projector embeddings."""
    feature_cache_dir: str | None = None
    """Where cached backbone features are kept (stages with feature_views); default
    model_dir/feature_cache. Runs on the same shards and backbone can share one."""
    stage1_from: str | None = None
    """Stage II starts from this run's finished stage I (its model_dir) instead of model_dir's."""
    word_embedding_init: str = "word2vec"
    """"word2vec": the shard folder's word2vec_init.npy (random where it is absent); "random"."""
    optimizer: str = "matconvnet_sgd"
    """One of optimization.OPTIMIZERS; every stage builds a fresh one."""
    label_smoothing: float = 0.0
    """Of both instance losses (losses.instance_loss)."""
    classifier_init: str = "random"
    """"random" (the layer's initializer) or "imprint": at the start of a fresh stage I, W's
    columns are set from the image head's features of each class's training images
    (instance_classifier.imprint)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        numbers = [stage.stage for stage in self.stages]
        if not numbers or numbers != sorted(set(numbers)) or not set(numbers) <= set(run_layout.STAGES):
            raise ValueError(f"stages must be 1, 2 or 1 then 2, got {numbers}")
        for stage in self.stages:
            if stage.epochs < 1:
                raise ValueError(f"stage {stage.stage}: epochs must be positive, got {stage.epochs}")
            if stage.feature_views < 0 or (stage.feature_views and stage.train_backbone):
                raise ValueError(f"stage {stage.stage}: cached features (feature_views "
                                 f"{stage.feature_views}) need a frozen backbone and a count >= 0")
            partial = (stage.backbone_trainable_from, stage.backbone_trainable_blocks)
            if any(part is not None for part in partial) and not stage.train_backbone:
                raise ValueError(f"stage {stage.stage}: the top of the backbone to train "
                                 f"(from {partial[0]!r}, last {partial[1]} blocks) is given, but "
                                 f"the stage freezes the backbone")
        if self.stage1_from and numbers != [2]:
            raise ValueError(f"stage1_from ({self.stage1_from}) starts stage II from another run's "
                             f"stage I: train stage 2 only, not stages {numbers}")
        if self.optimizer not in optimization.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {optimization.OPTIMIZERS}, got {self.optimizer!r}")
        if self.classifier_init not in instance_classifier.CLASSIFIER_INITS:
            raise ValueError(f"classifier_init must be one of {instance_classifier.CLASSIFIER_INITS}, "
                             f"got {self.classifier_init!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.word_embedding_init not in WORD_EMBEDDING_INITS:
            raise ValueError(f"word_embedding_init must be one of {WORD_EMBEDDING_INITS}, got "
                             f"{self.word_embedding_init!r}")
        if self.results_checkpoint not in ("best", "last"):
            raise ValueError(f"results_checkpoint must be 'best' or 'last', got "
                             f"{self.results_checkpoint!r}")
        if self.log_every_steps < 1 or self.checkpoint_every_steps < 0:
            raise ValueError("log_every_steps must be >= 1 and checkpoint_every_steps >= 0")
        if self.steps_per_loop < 1:
            raise ValueError(f"steps_per_loop must be >= 1, got {self.steps_per_loop}")


def create_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """default | mirrored (all local GPUs) | multi_worker (TF_CONFIG) | tpu (address `tpu`)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints, results and the run's files: the strategy's
    `extended.should_checkpoint`, False only on the non-chief workers of a multi-worker
    cluster (the chief is task "chief", else worker 0)."""
    return bool(strategy.extended.should_checkpoint)


def _random_states(model: keras.Model) -> list:
    """The model's variables that are not weights: its random seed generators' states (the
    dropout masks' stream), which Keras keeps out of the weights and so out of a checkpoint of
    the model. The training checkpoint saves them, so that a resumed stage draws the masks an
    uninterrupted one would."""
    weights = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


def _read_and_reset(means: dict) -> dict:
    """{name: float} of keras.metrics.Mean objects, which are reset."""
    values = {name: float(mean.result()) for name, mean in means.items()}
    for mean in means.values():
        mean.reset_state()
    return values


def _checkpoint_number(path: str) -> int:
    """N of a CheckpointManager path `.../ckpt-N` (the global step it was saved at)."""
    return int(path.rsplit("-", 1)[1])




def _read_images(shard_dir: str, split: str, indices: Sequence[int], size: int) -> dict:
    """{image index: uint8 [size, size, 3]} for the given image indices of a split."""
    wanted = tf.constant(sorted(set(int(index) for index in indices)), tf.int64)
    files = shard_format.shard_files(shard_dir, split, shard_format.IMAGES)
    records = (tf.data.TFRecordDataset(files)
               .map(shard_format.parse_image_example)
               .filter(lambda record: tf.reduce_any(tf.equal(record[shard_format.IMAGE_INDEX], wanted))))
    images = {}
    for record in records:
        image = tf.io.decode_jpeg(record[shard_format.IMAGE_ENCODED], channels=3)
        image = tf.image.resize(image, [size, size], antialias=True)
        images[int(record[shard_format.IMAGE_INDEX])] = tf.cast(tf.round(image), tf.uint8).numpy()
    return images


def retrieval_example_image(query: str, images: Sequence[np.ndarray], correct: Sequence[bool]) -> np.ndarray:
    """uint8 [H, W, 3]: the query caption over its top-K images, green frame = its own image."""
    from PIL import Image, ImageDraw

    border = 4
    tile = _THUMBNAIL + 2 * border
    lines = textwrap.wrap(query, width=max(20, tile * len(images) // _CHARACTER_WIDTH),
                          max_lines=_CAPTION_LINES, placeholder="...")
    strip = _LINE_HEIGHT * len(lines) + 8
    canvas = Image.new("RGB", (tile * len(images), tile + strip), "white")
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((4, 4), "\n".join(lines), fill="black", spacing=_LINE_HEIGHT - 11)
    for position, (image, is_correct) in enumerate(zip(images, correct)):
        left, top = position * tile, strip
        draw.rectangle([left, top, left + tile - 1, top + tile - 1],
                       fill=(30, 170, 60) if is_correct else (200, 40, 40))
        canvas.paste(Image.fromarray(image).resize((_THUMBNAIL, _THUMBNAIL)),
                     (left + border, top + border))
    return np.asarray(canvas)


def format_results_table(results: dict) -> str:
    """The R@K table of {split name: retrieval_metrics dict}, one row per split."""
    header = f"{'split':<12}" + "".join(f"{column:>9}" for column in RECALL_COLUMNS)
    rows = [header, "-" * len(header)]
    for split, metrics in results.items():
        rows.append(f"{split:<12}" + "".join(f"{metrics[column]:>9.2f}" for column in RECALL_COLUMNS))
    return "\n".join(rows)


class Trainer:
    """Builds the model once and runs the requested stages, then the final evaluation."""

    def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy | None = None):
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.chief = is_chief(self.strategy)
        self.manifest = input_pipeline.load_manifest(config.shard_dir)
        self.steps_per_epoch = input_pipeline.steps_per_epoch(self.manifest, config.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{config.shard_dir}: fewer training images than one batch of "
                             f"{config.batch_size}")
        if config.batch_size % self.strategy.num_replicas_in_sync:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                             f"{self.strategy.num_replicas_in_sync} replicas")
        self.has_validation = self._has_split(config.validation_split)
        init_path = text.word2vec_init_path(config.shard_dir)
        embedding_init = None
        if config.word_embedding_init == "word2vec":
            if tf.io.gfile.exists(init_path):
                embedding_init = np.load(init_path)
            else:
                logging.warning("%s does not exist: the word embedding starts random", init_path)
        with self.strategy.scope():
            self.model: DualPath = build_dual_path(config.model, embedding_init)
        for stage in config.stages:  # a wrong layer name fails now, not after stage I
            image_path.first_trainable_layer(self.model.backbone,
                                             from_layer=stage.backbone_trainable_from,
                                             blocks=stage.backbone_trainable_blocks)
        if self.chief:
            run_layout.save_model_config(config.model_dir, config.model)
        self.embedder = embeddings.SplitEmbedder(
            self.model.image_encoder, self.model.text_encoder, image_size=config.model.image_size,
            max_length=config.model.max_length, flip_images=config.eval_flip_images,
            shift_texts=config.eval_shift_texts, strategy=self.strategy)
        self._last_validation = (None, None, None)
        self._summary_step_offset = 0
        self._validation_curve: list[dict] = []
        self._texts_by_split: dict[str, list[str]] = {}
        weights = self.model.training_model.weights
        self._weights_are_finite = tf.function(lambda: tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(weight)) for weight in weights]))

    def _caption_texts(self, split: str) -> list[str]:
        """The split's raw captions by caption id, read from its shards once per run."""
        if split not in self._texts_by_split:
            self._texts_by_split[split] = input_pipeline.read_caption_texts(self.config.shard_dir, split)[0]
        return self._texts_by_split[split]

    def _has_split(self, split: str) -> bool:
        try:
            return input_pipeline.split_count(self.manifest, split) > 0
        except KeyError:
            return False

    def _write_dir(self, path: str) -> str:
        """Where this worker writes `path`: itself on the chief, a scratch copy elsewhere."""
        if self.chief:
            return path
        resolver = self.strategy.cluster_resolver
        return os.path.join(path, f".worker-{resolver.task_type}-{resolver.task_id}")

    # ---- one stage -------------------------------------------------------------------

    def prepare_stage(self, stage: StageConfig) -> tuple[optimization.PiecewiseConstantSchedule,
                                                          tf.Variable, keras.optimizers.Optimizer]:
        """Freezes or unfreezes the backbone as the stage says and returns its lr schedule, a
        fresh global step counter (int64, 0) and its optimizer, built on the trained variables
        (under the strategy's scope): what `make_train_step` takes."""
        config = self.config
        self.model.backbone.trainable = stage.train_backbone
        if stage.train_backbone:
            trained = image_path.train_top_of_backbone(
                self.model.backbone, from_layer=stage.backbone_trainable_from,
                blocks=stage.backbone_trainable_blocks)
            if trained:
                logging.info("stage %d trains %d of the backbone's layers, from %s on",
                             stage.stage, len(trained), trained[0])
            else:
                logging.info("stage %d keeps the whole backbone frozen", stage.stage)
        schedule = optimization.schedule_from_flags(
            stage.lr_boundaries, stage.lr_values, config.lr_boundary_unit, self.steps_per_epoch)
        with self.strategy.scope():
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            optimizer = optimization.build_optimizer(
                schedule.value_at(0), momentum=config.momentum, weight_decay=config.weight_decay,
                lr_multipliers=self._lr_multipliers(stage),
                loss_scaling=config.mixed_precision and not self._on_tpu, name=config.optimizer)
            optimizer.build(self.model.training_model.trainable_variables)
        return schedule, step, optimizer

    def _lr_multipliers(self, stage: StageConfig) -> dict:
        """variable.path -> lr multiplier: the model's own, and the backbone's trained weights at
        the stage's multipliers (BN scales and offsets, the first conv's kernel, the rest)."""
        multipliers = self.model.lr_multipliers()
        if not stage.train_backbone:
            return multipliers
        layers = image_path.leaf_layers(self.model.backbone)
        first_conv = next((layer for layer in layers if isinstance(layer, keras.layers.Conv2D)), None)
        for layer in layers:
            multiplier = stage.backbone_lr_multiplier
            if (isinstance(layer, keras.layers.BatchNormalization)
                    and stage.backbone_bn_lr_multiplier is not None):
                multiplier = stage.backbone_bn_lr_multiplier
            for variable in layer.trainable_weights:
                multipliers[variable.path] = multiplier
            if (layer is first_conv and layer.trainable
                    and stage.first_conv_lr_multiplier is not None):
                multipliers[layer.kernel.path] = stage.first_conv_lr_multiplier
        return multipliers

    def make_train_step(self, stage: StageConfig, optimizer, schedule, step: tf.Variable,
                        compiled: bool = True):
        """The training step of `stage`, as `run_stage` trains it.

        Freeze or unfreeze the backbone (`model.backbone.trainable = stage.train_backbone`)
        and build `optimizer` on `model.training_model.trainable_variables` first: the step
        updates the variables trainable now. With `stage.feature_views > 0` it runs
        `model.feature_training_model` on batches with "image_features" float32 [B, F] in place
        of "image" float32 [B, S, S, 3].

        Returns:
          a tf.function (the plain Python function with compiled=False, for `make_train_loop`):
          an iterator of (distributed) batches {"image" or "image_features",
          "token_ids" int32 [B, L], "label" int32 [B]} -> {"loss", "rank_loss", "image_loss",
          "text_loss", "image_accuracy", "text_accuracy"}: float32 scalars, global-batch means
          of one step. Each call sets the optimizer's lr to `schedule(step)`, updates the
          weights on `next(iterator)` and increments `step`.
        """
        config = self.config
        weights = stage.loss_weights
        hardest_negative = (config.hardest_negative if stage.hardest_negative is None
                            else stage.hardest_negative)
        variables = self.model.training_model.trainable_variables
        if stage.feature_views:
            model, image_input = self.model.feature_training_model, "image_features"
        else:
            model, image_input = self.model.training_model, "image"

        def replica_step(batch):
            with tf.GradientTape() as tape:
                outputs = model({image_input: batch[image_input], "token_ids": batch["token_ids"]},
                                training=True)
                image_loss = losses.instance_loss(outputs["image_logits"], batch["label"],
                                                  config.label_smoothing)
                text_loss = losses.instance_loss(outputs["text_logits"], batch["label"],
                                                 config.label_smoothing)
                if weights.rank:
                    rank_loss = losses.ranking_loss(
                        outputs["image_embedding"], outputs["text_embedding"], margin=config.margin,
                        hardest_negative=hardest_negative, labels=batch["label"])
                else:
                    rank_loss = tf.constant(0.0)
                total = weights.rank * rank_loss + weights.image * image_loss + weights.text * text_loss
                scaled = optimizer.scale_loss(total)
            # Dense gradients: the embedding's IndexedSlices become one tensor, so that the
            # loss-scale check of finiteness sees exactly what the update applies.
            gradients = [tf.convert_to_tensor(gradient)
                         for gradient in tape.gradient(scaled, variables)]
            optimizer.apply(gradients, variables)

            def accuracy(logits):
                correct = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), batch["label"])
                return tf.reduce_sum(tf.cast(correct, tf.float32)) / config.batch_size

            return {"loss": total, "rank_loss": rank_loss, "image_loss": image_loss,
                    "text_loss": text_loss, "image_accuracy": accuracy(outputs["image_logits"]),
                    "text_accuracy": accuracy(outputs["text_logits"])}

        def train_step(iterator):
            # Set in cross-replica context, before the step: the schedule of the global step.
            optimizer.learning_rate.assign(schedule(step))
            per_replica = self.strategy.run(replica_step, args=(next(iterator),))
            step.assign_add(1)
            return {name: self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                    for name, value in per_replica.items()}

        return tf.function(train_step) if compiled else train_step

    def make_train_loop(self, stage: StageConfig, optimizer, schedule, step: tf.Variable):
        """Several training steps per tf.function call, with the step's values averaged on
        the device: what `run_stage` trains with (`make_train_step` is one step of it).

        Returns:
          (train_loop, log_means, interval_means). train_loop(iterator, num_steps: int32
          scalar) runs up to num_steps steps of `make_train_step` and returns (finite: bool
          scalar, values: the last step's {name: float32 scalar}); it stops after the first
          step with a non-finite value, which it leaves out of the means. log_means and
          interval_means are {METRIC_NAMES: keras.metrics.Mean}, both updated every step; the
          caller reads and resets them (log interval, validation interval).
        """
        one_step = self.make_train_step(stage, optimizer, schedule, step, compiled=False)
        # Outside the strategy's scope: plain variables updated with the replica-reduced
        # values in cross-replica context, identical on every worker.
        log_means = {name: keras.metrics.Mean(name=f"log_{name}") for name in METRIC_NAMES}
        interval_means = {name: keras.metrics.Mean(name=f"interval_{name}") for name in METRIC_NAMES}

        @tf.function
        def train_loop(iterator, num_steps):
            finite = tf.constant(True)
            values = {name: tf.constant(0.0) for name in METRIC_NAMES}
            for _ in tf.range(num_steps):
                values = one_step(iterator)
                finite = tf.reduce_all(tf.stack([tf.math.is_finite(values[name])
                                                 for name in METRIC_NAMES]))
                if not finite:
                    break
                for name in METRIC_NAMES:
                    log_means[name].update_state(values[name])
                    interval_means[name].update_state(values[name])
            return finite, values

        return train_loop, log_means, interval_means

    def _feature_cache(self, stage: StageConfig) -> feature_cache.FeatureCache:
        """The frozen backbone's cached features of the stage's augmented training views."""
        config = self.config
        return feature_cache.load_or_compute(
            self.model.backbone, config.shard_dir,
            config.feature_cache_dir or os.path.join(config.model_dir, "feature_cache"),
            views=stage.feature_views, image_size=config.model.image_size, seed=config.seed,
            flip=config.flip)

    def _train_dataset(self, stage: StageConfig, start_step: int):
        config = self.config
        # The stage's stream from the step it (re)starts at: a resume continues the same order.
        seed = config.seed + 1_000_003 * stage.stage
        if stage.feature_views:
            cache = self._feature_cache(stage)
            dataset = input_pipeline.cached_feature_dataset(
                config.shard_dir, cache.features, cache.flipped, batch_size=config.batch_size,
                max_length=config.model.max_length, seed=seed, flip=config.flip,
                position_shift=config.position_shift, start_step=start_step)
        else:
            dataset = input_pipeline.train_dataset(
                config.shard_dir, batch_size=config.batch_size, image_size=config.model.image_size,
                max_length=config.model.max_length, seed=seed, flip=config.flip,
                position_shift=config.position_shift, start_step=start_step)
        return iter(self.strategy.experimental_distribute_dataset(
            input_pipeline.sharded_by_data(dataset)))

    def _training_backbone_features(self, stage: StageConfig) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [N, F] backbone features, int32 [N] labels) of the N training images.

        With cached features, the mean over each image's cached views. Otherwise the whole
        image (no crop or flip) through the backbone as the stage runs it: in training mode
        where the stage trains it (BN by batch statistics; its moving statistics are put back
        afterwards), else in inference mode.
        """
        config = self.config
        labels = np.zeros(input_pipeline.split_count(self.manifest, "train"), np.int32)
        captions = input_pipeline.read_captions(config.shard_dir, "train")
        labels[captions.image_index] = captions.label
        if stage.feature_views:
            return np.asarray(self._feature_cache(stage).features).mean(axis=1), labels
        backbone = self.model.backbone
        moving_statistics = [variable.numpy() for variable in backbone.non_trainable_variables]
        embed = tf.function(lambda images: backbone(images, training=stage.train_backbone))
        features = None
        for batch in input_pipeline.eval_image_dataset(
                config.shard_dir, "train", batch_size=embeddings.DEFAULT_IMAGE_BATCH,
                image_size=config.model.image_size):
            rows = embed(batch["image"]).numpy()
            if features is None:
                features = np.zeros((len(labels), rows.shape[1]), np.float32)
            features[batch["image_index"].numpy()] = rows
        for variable, value in zip(backbone.non_trainable_variables, moving_statistics):
            variable.assign(value)
        return features, labels

    def imprint_classifier(self, stage: StageConfig) -> None:
        """Sets the instance classifier(s) from the image head's features of every training
        image (`instance_classifier.imprint`): the head's whole-set training-mode output,
        without dropout, of the backbone features `_training_backbone_features` gives."""
        backbone_features, labels = self._training_backbone_features(stage)
        start = time.monotonic()
        head_features = self.model.image_head.whole_set_features(backbone_features)
        for classifier in self.model.classifiers():
            columns = instance_classifier.imprint(classifier, head_features, labels)
        logging.info("stage %d: imprinted %d classifier columns from the image features of %d "
                     "training images (%.1f s after the features)", stage.stage, columns, len(labels),
                     time.monotonic() - start)

    def run_stage(self, stage: StageConfig) -> dict:
        """Trains one stage to its end (or resumes it); returns its done marker."""
        config = self.config
        directory = run_layout.stage_dir(config.model_dir, stage.stage)
        done = run_layout.read_done_marker(config.model_dir, stage.stage)
        if done is not None:
            logging.info("stage %d already finished (%s): not trained again",
                         stage.stage, done["final_checkpoint"])
            return done

        model = self.model.training_model
        total_steps = stage.epochs * self.steps_per_epoch
        schedule, step, optimizer = self.prepare_stage(stage)
        with self.strategy.scope():
            epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            stage_number = tf.Variable(stage.stage, dtype=tf.int64, trainable=False, name="stage")
            best_rsum = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_rsum")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step, epoch=epoch,
                                         stage=stage_number, best_rsum=best_rsum,
                                         random_states=_random_states(model))
        manager = tf.train.CheckpointManager(
            checkpoint, self._write_dir(directory), max_to_keep=config.keep_checkpoints,
            step_counter=step, checkpoint_name="ckpt")
        best_manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=model, step=step, epoch=epoch, stage=stage_number,
                                best_rsum=best_rsum),
            self._write_dir(os.path.join(directory, run_layout.BEST_DIR)), max_to_keep=1,
            step_counter=step, checkpoint_name="ckpt")

        # Every worker resumes from the chief's checkpoints (a worker's own scratch copies
        # may be gone with its machine), so the cluster restarts at one step.
        latest = tf.train.latest_checkpoint(directory)
        if latest:
            checkpoint.restore(latest).assert_existing_objects_matched()
            if int(stage_number.numpy()) != stage.stage:
                raise ValueError(f"{latest} holds stage {int(stage_number.numpy())}, "
                                 f"not stage {stage.stage}")
            latest_best = tf.train.latest_checkpoint(os.path.join(directory, run_layout.BEST_DIR))
            if latest_best:
                # The best checkpoint may be newer than the last full one (killed in between).
                best_rsum.assign(max(float(best_rsum.numpy()), float(tf.train.load_variable(
                    latest_best, "best_rsum/.ATTRIBUTES/VARIABLE_VALUE"))))
            resumed_step = int(step.numpy())
            logging.info("stage %d: resumed from %s at step %d (epoch %d), lr %g",
                         stage.stage, latest, resumed_step, int(epoch.numpy()),
                         schedule.value_at(resumed_step))
        elif stage.stage == 2:
            self._load_stage1_final()
        elif config.classifier_init == "imprint":
            self.imprint_classifier(stage)

        writers = self._summary_writers(stage.stage)
        self._summary_step_offset = self._stage_start_global_step(stage.stage)
        if int(step.numpy()) < total_steps:
            self._train_loop(stage, schedule, step, epoch, best_rsum, optimizer, manager,
                             best_manager, writers)
        final_step, final_epoch = int(step.numpy()), int(epoch.numpy())
        if (manager.latest_checkpoint is None
                or _checkpoint_number(manager.latest_checkpoint) != final_step):
            self._save(manager, final_step, manager.latest_checkpoint)
        if self.has_validation:
            self._write_projector(stage.stage, final_step)
        done = {"final_checkpoint": os.path.basename(manager.latest_checkpoint),
                "step": final_step, "epoch": final_epoch, "best_rsum": float(best_rsum.numpy()),
                "best_checkpoint": (os.path.relpath(best_manager.latest_checkpoint, directory)
                                    if best_manager.latest_checkpoint else None)}
        if self.chief:
            run_layout.write_json_atomically(os.path.join(directory, run_layout.DONE_MARKER), done)
        logging.info("stage %d finished at step %d (epoch %d)", stage.stage, final_step, final_epoch)
        return done

    def _save(self, manager: tf.train.CheckpointManager, current: int,
              last_good: str | None) -> None:
        """Saves a checkpoint at step `current`, unless a weight is NaN or infinite (a finite
        loss can still end with an update that overflowed); last_good names the stage's
        latest full checkpoint for the error."""
        self._check_finite_weights(current, last_good)
        manager.save(checkpoint_number=current)

    def _check_finite_weights(self, current: int, last_good: str | None) -> None:
        if not bool(self._weights_are_finite()):
            raise NonFiniteLossError(
                f"a model weight is not finite after step {current}. Stopped without saving; the "
                f"last good checkpoint is {last_good or 'none (no checkpoint yet)'}")

    @property
    def _on_tpu(self) -> bool:
        return isinstance(self.strategy, tf.distribute.TPUStrategy)

    @property
    def _stage1_dir(self) -> str:
        """The run whose stage I stage II starts from: stage1_from, else this one."""
        return self.config.stage1_from or self.config.model_dir

    def _load_stage1_final(self) -> None:
        stage1_dir = self._stage1_dir
        done = run_layout.read_done_marker(stage1_dir, 1)
        if done is None:
            raise FileNotFoundError(
                f"stage II starts from stage I's final checkpoint, but "
                f"{os.path.join(run_layout.stage_dir(stage1_dir, 1), run_layout.DONE_MARKER)}"
                " does not exist: "
                f"train stage I first (--stage=1 or --stage=both)")
        path = run_layout.checkpoint_path(stage1_dir, 1, done, "last")
        tf.train.Checkpoint(model=self.model.training_model).read(path).expect_partial() \
            .assert_existing_objects_matched()
        logging.info("stage 2: starts from stage I's final checkpoint %s", path)

    def _stage_start_global_step(self, stage: int) -> int:
        """The global step at which the stage's step 0 lies: 0 for stage I, stage I's final
        step (its done marker, in stage1_from or model_dir) for stage II."""
        if stage == 1:
            return 0
        done = run_layout.read_done_marker(self._stage1_dir, 1)
        if done is None:
            logging.warning("no stage I done marker in %s: stage II's TensorBoard steps start at 0",
                            self._stage1_dir)
            return 0
        return int(done["step"])

    def _summary_step(self, current: int) -> int:
        """TensorBoard's step for the stage's step `current`: the run's global step."""
        return self._summary_step_offset + current

    def _summary_writers(self, stage: int) -> dict:
        """{"train", "validation"}: file writers where the strategy says this process writes
        summaries (`extended.should_save_summary`), no-op writers elsewhere."""
        logs = os.path.join(self.config.model_dir, "logs", f"stage{stage}")
        if not self.strategy.extended.should_save_summary:
            return {"train": tf.summary.create_noop_writer(),
                    "validation": tf.summary.create_noop_writer()}
        return {name: tf.summary.create_file_writer(os.path.join(logs, name))
                for name in ("train", "validation")}

    def _train_loop(self, stage, schedule, step, epoch, best_rsum, optimizer, manager,
                    best_manager, writers) -> None:
        """Trains the stage to its end in calls of `make_train_loop`'s loop, each ending at
        the next log, checkpoint or epoch boundary at the latest. The host reads the step and
        the loop's finiteness once per call, and the means only at log and validation
        intervals."""
        config = self.config
        total_steps = stage.epochs * self.steps_per_epoch
        train_loop, log_means, interval_means = self.make_train_loop(stage, optimizer, schedule, step)
        iterator = self._train_dataset(stage, int(step.numpy()))
        current = int(step.numpy())
        interval_steps, interval_start = 0, time.monotonic()
        while current < total_steps:
            num_steps = min(config.steps_per_loop, self._steps_to_boundary(current, total_steps))
            finite, values = train_loop(iterator, tf.constant(num_steps, tf.int32))
            previous, current = current, int(step.numpy())
            if not bool(finite):
                bad = [name for name in METRIC_NAMES if not math.isfinite(float(values[name]))]
                raise NonFiniteLossError(
                    f"stage {stage.stage} step {current}: "
                    + ", ".join(f"{name} = {float(values[name])}" for name in bad)
                    + f" (lr {schedule.value_at(current - 1):g}). Stopped without saving; the last "
                    f"good checkpoint is {manager.latest_checkpoint or 'none (no checkpoint yet)'}")
            interval_steps += current - previous

            epoch_end = current % self.steps_per_epoch == 0
            if current % config.log_every_steps == 0 or epoch_end or current == total_steps:
                elapsed = max(time.monotonic() - interval_start, 1e-9)
                self._log_progress(stage, current, total_steps, schedule.value_at(current - 1),
                                   _read_and_reset(log_means), interval_steps / elapsed,
                                   writers["train"])
                interval_steps = 0
            if epoch_end:
                self._check_finite_weights(current, manager.latest_checkpoint)
                epoch.assign(current // self.steps_per_epoch)
                finished = int(epoch.numpy())
                interval_end = finished % config.validate_every_epochs == 0 or current == total_steps
                if interval_end:
                    self._check_instance_health(stage, finished, _read_and_reset(interval_means),
                                                writers["train"], current)
                if self.has_validation and interval_end:
                    rsum = self._validate(stage.stage, current, writers["validation"])
                    if rsum > float(best_rsum.numpy()):
                        best_rsum.assign(rsum)
                        self._save(best_manager, current, manager.latest_checkpoint)
                        logging.info("stage %d epoch %d: new best validation rsum %.2f",
                                     stage.stage, finished, rsum)
                self._save(manager, current, manager.latest_checkpoint)
            elif config.checkpoint_every_steps and current % config.checkpoint_every_steps == 0:
                self._save(manager, current, manager.latest_checkpoint)
            if interval_steps == 0:  # the speed of the next log leaves out validation and saving
                interval_start = time.monotonic()
        for writer in writers.values():
            writer.flush()

    def _steps_to_boundary(self, current: int, total_steps: int) -> int:
        """Steps from `current` to the next log, checkpoint, epoch or stage end."""
        config = self.config
        periods = [config.log_every_steps, self.steps_per_epoch]
        if config.checkpoint_every_steps:
            periods.append(config.checkpoint_every_steps)
        return min([total_steps - current] + [period - current % period for period in periods])

    def _check_instance_health(self, stage: StageConfig, finished_epoch: int, means: dict,
                               writer, current: int) -> None:
        """Warns (log and TensorBoard text) about each trained instance loss that stayed at
        chance over the validation interval that just ended (`instance_health.inert_paths`)."""
        weights = {"image": stage.loss_weights.image, "text": stage.loss_weights.text}
        trained = [path for path, weight in weights.items() if weight]
        inert = instance_health.inert_paths(
            {path: means[f"{path}_loss"] for path in trained},
            {path: means[f"{path}_accuracy"] for path in trained}, self.config.model.num_classes)
        for path, reason in inert.items():
            message = (f"stage {stage.stage} epoch {finished_epoch}: the {path} path's instance "
                       f"loss is not learning over the last validation interval: {reason}")
            logging.warning("%s", message)
            with writer.as_default(step=self._summary_step(current)):
                tf.summary.text(f"health/{path}_instance_loss", message)

    def _log_progress(self, stage, current, total_steps, lr, means, steps_per_second, writer):
        config = self.config
        examples_per_second = steps_per_second * config.batch_size
        epoch_progress = current / self.steps_per_epoch
        logging.info(
            "stage %d | epoch %.2f/%d | step %d/%d | loss %.4f (rank %.4f image %.4f text %.4f) | "
            "accuracy image %.3f text %.3f | lr %.3g | %.1f examples/s",
            stage.stage, epoch_progress, stage.epochs, current, total_steps, means["loss"],
            means["rank_loss"], means["image_loss"], means["text_loss"], means["image_accuracy"],
            means["text_accuracy"], lr, examples_per_second)
        with writer.as_default(step=self._summary_step(current)):
            for name, value in means.items():
                tf.summary.scalar(f"loss/{name}" if name.endswith("loss") else f"accuracy/{name}",
                                  value)
            tf.summary.scalar("optimizer/learning_rate", lr)
            tf.summary.scalar("speed/steps_per_second", steps_per_second)
            tf.summary.scalar("speed/examples_per_second", examples_per_second)

    # ---- evaluation ------------------------------------------------------------------

    def split_embeddings(self, split: str) -> embeddings.SplitEmbeddings:
        return self.embedder(self.config.shard_dir, split)

    def evaluate(self, split: str) -> tuple[dict, embeddings.SplitEmbeddings, np.ndarray]:
        """(retrieval_metrics, the embeddings, similarity [N, M]) of a split."""
        return self._metrics(self.split_embeddings(split))

    def _metrics(self, split_embeddings: embeddings.SplitEmbeddings
                 ) -> tuple[dict, embeddings.SplitEmbeddings, np.ndarray]:
        similarity = split_embeddings.image @ split_embeddings.text.T
        metrics = evaluation.retrieval_metrics(similarity, split_embeddings.image_of_text,
                                               folds=self.config.eval_folds)
        return metrics, split_embeddings, similarity

    def _validate(self, stage: int, current: int, writer) -> float:
        split = self.config.validation_split
        metrics, split_embeddings, similarity = self.evaluate(split)
        self._last_validation = (stage, current, split_embeddings)
        self._validation_curve.append({"stage": stage, "step": current,
                                       "epoch": current / self.steps_per_epoch,
                                       "rsum": metrics["rsum"]})
        logging.info("stage %d step %d | %s | %s", stage, current, split,
                     " ".join(f"{name} {metrics[name]:.2f}" for name in RECALL_COLUMNS))
        with writer.as_default(step=self._summary_step(current)):
            for name, value in metrics.items():
                tf.summary.scalar(f"retrieval/{name}", value)
            if self.chief:
                self._retrieval_example_summary(split, split_embeddings, similarity)
        writer.flush()
        return metrics["rsum"]

    def _retrieval_example_summary(self, split, split_embeddings, similarity) -> None:
        """Caption 0 of the split as a query and its top-K images, as an image summary."""
        query = 0
        top = np.argsort(-similarity[:, query], kind="stable")[:RETRIEVAL_EXAMPLE_TOP_K]
        truth = int(split_embeddings.image_of_text[query])
        caption = self._caption_texts(split)[query]
        images = _read_images(self.config.shard_dir, split, top, _THUMBNAIL)
        grid = retrieval_example_image(caption, [images[int(index)] for index in top],
                                       [int(index) == truth for index in top])
        tf.summary.image("retrieval_example/text_to_top5_images", grid[np.newaxis])
        tf.summary.text("retrieval_example/query",
                        f"{caption} (its image: {truth}; top {len(top)}: {top.tolist()})")

    def _write_projector(self, stage: int, step: int) -> None:
        """The validation embeddings (images and their captions) for TensorBoard's projector."""
        if not self.chief:
            return
        from tensorboard.plugins import projector

        split = self.config.validation_split
        cached_stage, cached_step, split_embeddings = self._last_validation
        if (cached_stage, cached_step) != (stage, step):
            split_embeddings = self.split_embeddings(split)
        num_images = min(self.config.projector_images, len(split_embeddings.image))
        captions = np.flatnonzero(split_embeddings.image_of_text < num_images)
        texts = self._caption_texts(split)
        # TensorBoard lists as runs only folders with event files, and resolves a checkpoint
        # path in projector_config.pbtxt against its own working directory: so the embeddings
        # go into the validation run, and the config names no checkpoint, leaving TensorBoard
        # to find the folder's latest through its `checkpoint` file (relative, so the run can
        # move).
        log_dir = os.path.join(self.config.model_dir, "logs", f"stage{stage}", "validation")
        tf.io.gfile.makedirs(log_dir)
        with tf.io.gfile.GFile(os.path.join(log_dir, PROJECTOR_METADATA), "w") as metadata:
            metadata.write("kind\timage\ttext\n")
            for index in range(num_images):
                metadata.write(f"image\t{index}\t\n")
            for caption_id in captions:
                clean = " ".join(texts[caption_id].split())
                metadata.write(f"caption\t{split_embeddings.image_of_text[caption_id]}\t{clean}\n")
        vectors = np.concatenate([split_embeddings.image[:num_images], split_embeddings.text[captions]])
        tf.train.CheckpointManager(
            tf.train.Checkpoint(embedding=tf.Variable(vectors)), log_dir, max_to_keep=1,
            checkpoint_name="embedding").save(checkpoint_number=self._summary_step(step))
        projector_config = projector.ProjectorConfig()
        embedding = projector_config.embeddings.add()
        embedding.tensor_name = PROJECTOR_TENSOR
        embedding.metadata_path = PROJECTOR_METADATA
        projector.visualize_embeddings(log_dir, projector_config)

    # ---- the whole run ---------------------------------------------------------------

    def final_results(self, stage: int, done: dict) -> dict:
        """Metrics of the stage's best-by-validation checkpoint (its last one with
        results_checkpoint="last" or without a validation split) on the validation split
        and, when asked and present, the test split."""
        config = self.config
        chosen = run_layout.checkpoint_path(config.model_dir, stage, done, config.results_checkpoint)
        run_layout.load_checkpoint(self.model, chosen)
        results = {"checkpoint": chosen, "stage": stage, "metrics": {},
                   "validation_curve": list(self._validation_curve)}
        splits = [config.validation_split] if self.has_validation else []
        if config.evaluate_test and self._has_split(config.test_split):
            splits.append(config.test_split)
        elif config.evaluate_test:
            logging.warning("no %r split in %s: test results skipped", config.test_split,
                            config.shard_dir)
        validated_stage, validated_step, validated = self._last_validation
        final_weights_validated = ((validated_stage, validated_step) == (stage, done["step"])
                                   and os.path.basename(chosen) == done["final_checkpoint"])
        for split in splits:
            if split == config.validation_split and final_weights_validated:
                # The end-of-stage validation embedded these very weights: not again.
                results["metrics"][split] = self._metrics(validated)[0]
            else:
                results["metrics"][split] = self.evaluate(split)[0]
        return results

    def train(self) -> dict:
        """Runs the configured stages, then writes and prints the final results."""
        done = None
        for stage in self.config.stages:
            done = self.run_stage(stage)
        last_stage = self.config.stages[-1].stage
        results = self.final_results(last_stage, done)
        if results["metrics"]:
            logging.info("final retrieval results of stage %d, %s:", last_stage,
                         results["checkpoint"])
            print(format_results_table(results["metrics"]), flush=True)
        if self.chief:
            run_layout.write_json_atomically(
                os.path.join(self.config.model_dir, run_layout.RESULTS_NAME), results)
        return results


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None) -> dict:
    """Trains config's stages under `strategy` (default: the current one); returns the results.

    With config.mixed_precision the global Keras dtype policy is mixed_float16
    (mixed_bfloat16 on TPU) while the model is built and trained, and restored afterwards.
    The initial weights come from config.seed, like the data order and augmentation.
    """
    keras.utils.set_random_seed(config.seed)
    strategy = strategy or tf.distribute.get_strategy()
    previous_policy = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        on_tpu = isinstance(strategy, tf.distribute.TPUStrategy)
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if on_tpu else "mixed_float16")
    try:
        return Trainer(config, strategy).train()
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
