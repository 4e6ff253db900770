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
(`dual_path.instance_health`) and warns, in the log and in TensorBoard, when it has not; at
every epoch's end it warns when a path's train instance accuracy over the epoch falls below
half its peak, stage I's last epoch included (stage II's start undoing what stage I taught).
With `--stageN_weight_average_momentum`, the optimizer keeps a moving average of the trained
weights: every validation scores the averages (`optimization.averaged_weights`), and at the
stage's end they become the weights, before precise BN and the final checkpoint.

The trainer is made of parts a reader can name:
  dual_path/task.py                the losses of a batch (what a stage optimises)
  Trainer.make_train_step / _loop  one step under `strategy.run`, several per tf.function call
  Trainer._train_loop              the loop over a stage's steps, with its StageState
  dual_path/checkpointing.py       the stage's checkpoints, resume and done marker
  dual_path/validation.py          validation through `dual_path.protocols`, the curve
  dual_path/tensorboard_extras.py  the retrieval example and the projector

One training step (`Trainer.make_train_step`) runs under `strategy.run`: every loss follows
`dual_path.losses`' convention (sum over the replica's rows / global batch size), the
optimizer all-reduces the gradients with SUM, and the per-replica losses are reduced with
SUM, so the numbers are global-batch means for any number of replicas.

What a run writes under model_dir (see WORKSPACE.md):
  flags.txt                              the resolved flags (written by experiments/train.py)
  config.json                            the resolved config tree (`dual_path.config`)
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
import contextlib
import dataclasses
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dual_path import checkpointing, embeddings, evaluation, feature_cache, image_path
from dual_path import input_pipeline, instance_classifier, instance_health, optimization
from dual_path import run_layout, task, tensorboard_extras, text
from dual_path.checkpointing import NonFiniteLossError
from dual_path.config import StageConfig, TrainConfig
from dual_path.model import DualPath, build_dual_path
from dual_path.validation import Validator

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


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


def _read_and_reset(means: dict) -> dict:
    """{name: float} of keras.metrics.Mean objects, which are reset."""
    values = {name: float(mean.result()) for name, mean in means.items()}
    for mean in means.values():
        mean.reset_state()
    return values


@dataclasses.dataclass
class StageState:
    """One stage in training: its config, lr schedule, optimizer, variables (step, epoch,
    best rsum), checkpoints and TensorBoard writers ({"train", "validation"})."""

    stage: StageConfig
    schedule: optimization.PiecewiseConstantSchedule
    optimizer: keras.optimizers.Optimizer
    variables: checkpointing.StageVariables
    checkpoints: checkpointing.StageCheckpoints
    writers: dict
    last_epoch_accuracy: dict = dataclasses.field(default_factory=dict)
    """Trained path -> its train instance accuracy over the last epoch this process trained."""

    @property
    def step(self) -> int:
        return int(self.variables.step.numpy())


class Trainer:
    """Builds the model once and runs the requested stages, then the final evaluation."""

    def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy | None = None,
                 draw_retrieval_example: tensorboard_extras.DrawRetrievalExample | None = None):
        """draw_retrieval_example: draws each validation's retrieval example as a TensorBoard
        image (`tensorboard_extras`); without it the example is text only."""
        self.config = config
        self.draw_retrieval_example = draw_retrieval_example
        self.strategy = strategy or tf.distribute.get_strategy()
        self.chief = is_chief(self.strategy)
        self.manifest = input_pipeline.load_manifest(config.shard_dir)
        self.steps_per_epoch: dict[int, int] = {}
        """stage number -> its steps per epoch (its batch size's full batches)."""
        for stage in config.stages:
            batch_size = config.stage_batch_size(stage)
            self.steps_per_epoch[stage.stage] = input_pipeline.steps_per_epoch(self.manifest, batch_size)
            if self.steps_per_epoch[stage.stage] < 1:
                raise ValueError(f"{config.shard_dir}: fewer training images than one batch of "
                                 f"{batch_size} (stage {stage.stage})")
            if batch_size % self.strategy.num_replicas_in_sync:
                raise ValueError(f"stage {stage.stage}: batch_size {batch_size} is not divisible "
                                 f"by the {self.strategy.num_replicas_in_sync} replicas")
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
            self._trained_top(stage)
        if self.chief:
            run_layout.save_run_config(config)
        self.embedder = embeddings.SplitEmbedder(
            self.model.image_encoder, self.model.text_encoder, image_size=config.model.image_size,
            max_length=config.model.max_length, flip_images=config.eval_flip_images,
            shift_texts=config.eval_shift_texts, strategy=self.strategy)
        self.validator = Validator(self.embedder, config.shard_dir, config.eval_folds,
                                   self.steps_per_epoch)
        self._summary_step_offset = 0
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
                blocks=stage.backbone_trainable_blocks, freeze_batch_norm=stage.backbone_bn_frozen)
            if trained:
                logging.info("stage %d trains %d of the backbone's layers, from %s on",
                             stage.stage, len(trained), trained[0])
            else:
                logging.info("stage %d keeps the whole backbone frozen", stage.stage)
        schedule = optimization.schedule_from_flags(
            stage.lr_boundaries, stage.lr_values, config.lr_boundary_unit,
            self.steps_per_epoch[stage.stage])
        with self.strategy.scope():
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            optimizer = optimization.build_optimizer(
                schedule.value_at(0), momentum=config.momentum, weight_decay=config.weight_decay,
                lr_multipliers=self._lr_multipliers(stage),
                loss_scaling=config.mixed_precision and not self._on_tpu, name=stage.optimizer,
                weight_average_momentum=stage.weight_average_momentum)
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
        variables = self.model.training_model.trainable_variables
        if stage.feature_views:
            model, image_input = self.model.feature_training_model, "image_features"
        else:
            model, image_input = self.model.training_model, "image"

        def replica_step(batch):
            with tf.GradientTape() as tape:
                outputs = model({image_input: batch[image_input], "token_ids": batch["token_ids"]},
                                training=True)
                values = task.batch_losses(outputs, batch["label"], config, stage)
                scaled = optimizer.scale_loss(values["loss"])
            # Dense gradients: the embedding's IndexedSlices become one tensor, so that the
            # loss-scale check of finiteness sees exactly what the update applies.
            gradients = [tf.convert_to_tensor(gradient)
                         for gradient in tape.gradient(scaled, variables)]
            optimizer.apply(gradients, variables)
            return values

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
          interval_means are {task.METRIC_NAMES: keras.metrics.Mean}, both updated every step; the
          caller reads and resets them (log interval, validation interval).
        """
        one_step = self.make_train_step(stage, optimizer, schedule, step, compiled=False)
        # Outside the strategy's scope: plain variables updated with the replica-reduced
        # values in cross-replica context, identical on every worker.
        names = task.METRIC_NAMES
        log_means = {name: keras.metrics.Mean(name=f"log_{name}") for name in names}
        interval_means = {name: keras.metrics.Mean(name=f"interval_{name}") for name in names}

        @tf.function
        def train_loop(iterator, num_steps):
            finite = tf.constant(True)
            values = {name: tf.constant(0.0) for name in task.METRIC_NAMES}
            for _ in tf.range(num_steps):
                values = one_step(iterator)
                finite = tf.reduce_all(tf.stack([tf.math.is_finite(values[name])
                                                 for name in task.METRIC_NAMES]))
                if not finite:
                    break
                for name in task.METRIC_NAMES:
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
                config.shard_dir, cache.features, cache.flipped,
                batch_size=config.stage_batch_size(stage),
                max_length=config.model.max_length, seed=seed, flip=config.flip,
                position_shift=config.position_shift, start_step=start_step)
        else:
            dataset = input_pipeline.train_dataset(
                config.shard_dir, batch_size=config.stage_batch_size(stage),
                image_size=config.model.image_size, max_length=config.model.max_length, seed=seed,
                flip=config.flip, position_shift=config.position_shift, start_step=start_step)
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

    def reestimate_backbone_batch_norm(self, stage: StageConfig, from_layer: int) -> None:
        """`reestimate_batch_norm_on_training_views` on this run's backbone in batches of the
        stage's size (batch statistics depend on it), logged."""
        start = time.monotonic()
        batch_size = self.config.stage_batch_size(stage)
        batches = reestimate_batch_norm_on_training_views(self.model.backbone, self.config,
                                                          from_layer, batch_size)
        logging.info("re-estimated the BatchNorm statistics of the backbone from its layer %d (%s) "
                     "on %d batches of %d training views in %.1f s", from_layer,
                     image_path.leaf_layers(self.model.backbone)[from_layer].name, batches,
                     batch_size, time.monotonic() - start)

    def _trained_top(self, stage: StageConfig) -> int:
        """Where the backbone's part that `stage` trains starts (`image_path.first_trainable_layer`)."""
        return image_path.first_trainable_layer(self.model.backbone,
                                                from_layer=stage.backbone_trainable_from,
                                                blocks=stage.backbone_trainable_blocks)

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
        done = run_layout.read_done_marker(config.model_dir, stage.stage)
        if done is not None:
            logging.info("stage %d already finished (%s): not trained again",
                         stage.stage, done["final_checkpoint"])
            return done
        state = self._start_stage(stage)
        self._summary_step_offset = self._stage_start_global_step(stage.stage)
        if state.step < stage.epochs * self.steps_per_epoch[stage.stage]:
            self._train_loop(state)
        done = state.checkpoints.finish(write=self.chief,
                                        train_accuracy=state.last_epoch_accuracy or None)
        if self.has_validation:
            self._write_projector(stage.stage, done["step"])
        logging.info("stage %d finished at step %d (epoch %d)", stage.stage, done["step"], done["epoch"])
        return done

    def _start_stage(self, stage: StageConfig) -> StageState:
        """The stage's state, resumed from its latest checkpoint, else at its start: stage II
        from stage I's final weights, stage I with an imprinted classifier where asked."""
        schedule, step, optimizer = self.prepare_stage(stage)
        with self.strategy.scope():
            variables = checkpointing.StageVariables.create(stage.stage, step)
        checkpoints = checkpointing.StageCheckpoints(
            self.config.model_dir, stage.stage, self.model.training_model, optimizer, variables,
            keep=self.config.keep_checkpoints, write_dir=self._write_dir,
            weights_are_finite=self._weights_are_finite)
        # Every worker resumes from the chief's checkpoints (a worker's own scratch copies
        # may be gone with its machine), so the cluster restarts at one step.
        latest = checkpoints.restore_latest()
        if latest:
            resumed_step = int(step.numpy())
            logging.info("stage %d: resumed from %s at step %d (epoch %d), lr %g",
                         stage.stage, latest, resumed_step, int(variables.epoch.numpy()),
                         schedule.value_at(resumed_step))
        elif stage.stage == 2:
            checkpointing.load_stage1_final(self.model, self._stage1_dir)
        else:
            if self.config.backbone_bn_statistics == "training_views":
                self.reestimate_backbone_batch_norm(stage, 0)
            elif self.config.backbone_bn_statistics == "training_views_stage2_top":
                stage2 = self.config.stages[1]
                self.reestimate_backbone_batch_norm(stage2, self._trained_top(stage2))
            if self.config.classifier_init == "imprint":
                self.imprint_classifier(stage)
        return StageState(stage, schedule, optimizer, variables, checkpoints,
                          self._summary_writers(stage.stage))

    @property
    def _on_tpu(self) -> bool:
        return isinstance(self.strategy, tf.distribute.TPUStrategy)

    @property
    def _stage1_dir(self) -> str:
        """The run whose stage I stage II starts from: stage1_from, else this one."""
        return self.config.stage1_from or self.config.model_dir

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

    def _train_loop(self, state: StageState) -> None:
        """Trains the stage to its end in calls of `make_train_loop`'s loop, each ending at
        the next log, checkpoint or epoch boundary at the latest. The host reads the step and
        the loop's finiteness once per call, and the means only at log and validation
        intervals."""
        config, stage, checkpoints = self.config, state.stage, state.checkpoints
        steps_per_epoch = self.steps_per_epoch[stage.stage]
        total_steps = stage.epochs * steps_per_epoch
        train_loop, log_means, interval_means = self.make_train_loop(
            stage, state.optimizer, state.schedule, state.variables.step)
        iterator = self._train_dataset(stage, state.step)
        collapse = instance_health.AccuracyCollapse(self._previous_stage_accuracy(stage))
        trained_paths = self._instance_trained_paths(stage)
        epoch_hits, epoch_steps = dict.fromkeys(trained_paths, 0.0), 0
        current = state.step
        interval_steps, interval_start = 0, time.monotonic()
        while current < total_steps:
            num_steps = min(config.steps_per_loop,
                            self._steps_to_boundary(current, total_steps, steps_per_epoch))
            finite, values = train_loop(iterator, tf.constant(num_steps, tf.int32))
            previous, current = current, state.step
            if not bool(finite):
                bad = [name for name in task.METRIC_NAMES if not math.isfinite(float(values[name]))]
                raise NonFiniteLossError(
                    f"stage {stage.stage} step {current}: "
                    + ", ".join(f"{name} = {float(values[name])}" for name in bad)
                    + f" (lr {state.schedule.value_at(current - 1):g}). Stopped without saving; "
                    f"the last good checkpoint is {checkpoints.last_good}")
            interval_steps += current - previous

            epoch_end = current % steps_per_epoch == 0
            if current % config.log_every_steps == 0 or epoch_end or current == total_steps:
                elapsed = max(time.monotonic() - interval_start, 1e-9)
                means, lr = _read_and_reset(log_means), state.schedule.value_at(current - 1)
                self._log_progress(stage, current, total_steps, lr, means,
                                   interval_steps / elapsed, state.writers["train"])
                for path in trained_paths:
                    epoch_hits[path] += means[f"{path}_accuracy"] * interval_steps
                epoch_steps += interval_steps
                interval_steps = 0
            if epoch_end:
                checkpoints.check_finite(current)
                state.variables.epoch.assign(current // steps_per_epoch)
                finished = current // steps_per_epoch
                state.last_epoch_accuracy = {path: hits / epoch_steps
                                             for path, hits in epoch_hits.items()}
                self._check_accuracy_collapse(stage, current, finished, state.last_epoch_accuracy,
                                              epoch_steps * config.stage_batch_size(stage),
                                              collapse, state.writers["train"],
                                              state.schedule.value_at(current - 1))
                epoch_hits, epoch_steps = dict.fromkeys(trained_paths, 0.0), 0
                interval_end = finished % config.validate_every_epochs == 0 or current == total_steps
                if interval_end:
                    self._check_instance_health(stage, finished, _read_and_reset(interval_means),
                                                state.writers["train"], current)
                if interval_end:
                    self._end_interval(state, current, finished, final=current == total_steps)
                checkpoints.save(current)
            elif config.checkpoint_every_steps and current % config.checkpoint_every_steps == 0:
                checkpoints.save(current)
            if interval_steps == 0:  # the speed of the next log leaves out validation and saving
                interval_start = time.monotonic()
        for writer in state.writers.values():
            writer.flush()

    def _end_interval(self, state: StageState, current: int, finished: int, final: bool) -> None:
        """At a validation interval's end: the weights' moving averages in (for good at the
        stage's end), precise BN, validation and, on a new best rsum, the best checkpoint; the
        trained weights back after a mid-stage interval (their BN statistics stay those of the
        averages: training normalises with batch statistics)."""
        stage, variables = state.stage, self.model.training_model.trainable_variables
        if final:
            state.optimizer.finalize_variable_values(variables)
        with contextlib.nullcontext() if final else optimization.averaged_weights(
                state.optimizer, variables):
            if stage.precise_bn:
                self.reestimate_backbone_batch_norm(stage, self._trained_top(stage))
            if self.has_validation:
                rsum = self._validate(stage.stage, current, state.writers["validation"])
                if rsum > float(state.variables.best_rsum.numpy()):
                    state.variables.best_rsum.assign(rsum)
                    state.checkpoints.save_best(current)
                    logging.info("stage %d epoch %d: new best validation rsum %.2f",
                                 stage.stage, finished, rsum)

    def _steps_to_boundary(self, current: int, total_steps: int, steps_per_epoch: int) -> int:
        """Steps from `current` to the next log, checkpoint, epoch or stage end."""
        config = self.config
        periods = [config.log_every_steps, steps_per_epoch]
        if config.checkpoint_every_steps:
            periods.append(config.checkpoint_every_steps)
        return min([total_steps - current] + [period - current % period for period in periods])

    @staticmethod
    def _instance_trained_paths(stage: StageConfig) -> list[str]:
        """The paths ("image", "text") whose instance loss the stage trains (weight > 0)."""
        weights = {"image": stage.loss_weights.image, "text": stage.loss_weights.text}
        return [path for path, weight in weights.items() if weight]

    def _previous_stage_accuracy(self, stage: StageConfig) -> dict[str, float] | None:
        """Stage II: stage I's train instance accuracy over its last epoch, per path it
        trained (its done marker's "train_accuracy"; None from a marker without it)."""
        if stage.stage == 1:
            return None
        done = run_layout.read_done_marker(self._stage1_dir, 1)
        return (done or {}).get("train_accuracy")

    def _check_accuracy_collapse(self, stage: StageConfig, current: int, finished_epoch: int,
                                 accuracy: dict, examples: int,
                                 collapse: instance_health.AccuracyCollapse, writer,
                                 lr: float) -> None:
        """Warns (log and TensorBoard text) about each trained path whose train instance
        accuracy over the epoch just ended (`examples` training examples) fell far below its
        peak (`instance_health.AccuracyCollapse`)."""
        for path, reason in collapse.update(finished_epoch, accuracy, examples).items():
            message = (f"stage {stage.stage} epoch {finished_epoch}: the {path} path's instance "
                       f"loss is losing what it learnt: {reason} (lr {lr:g} at step {current})")
            logging.warning("%s", message)
            with writer.as_default(step=self._summary_step(current)):
                tf.summary.text(f"health/{path}_accuracy_collapse", message)

    def _check_instance_health(self, stage: StageConfig, finished_epoch: int, means: dict,
                               writer, current: int) -> None:
        """Warns (log and TensorBoard text) about each trained instance loss that stayed at
        chance over the validation interval that just ended (`instance_health.inert_paths`)."""
        trained = self._instance_trained_paths(stage)
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
        examples_per_second = steps_per_second * config.stage_batch_size(stage)
        epoch_progress = current / self.steps_per_epoch[stage.stage]
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

    def evaluate(self, split: str) -> tuple[dict, embeddings.SplitEmbeddings, np.ndarray]:
        """(retrieval metrics, the embeddings, similarity [N, M]) of a split, current weights."""
        return self.validator.evaluate(split)

    def _validate(self, stage: int, current: int, writer) -> float:
        """Validates the current weights: log line, TensorBoard scalars and retrieval example."""
        split = self.config.validation_split
        validation = self.validator.validate(split, stage, current)
        metrics = validation.metrics
        logging.info("stage %d step %d | %s | %s", stage, current, split,
                     " ".join(f"{name} {metrics[name]:.2f}" for name in (*evaluation.RECALL_KEYS, "rsum")))
        with writer.as_default(step=self._summary_step(current)):
            for name, value in metrics.items():
                tf.summary.scalar(f"retrieval/{name}", value)
            if self.chief:
                query = 0
                example = tensorboard_extras.retrieval_example(
                    self.config.shard_dir, split, self._caption_texts(split)[query],
                    validation.split_embeddings.image_of_text[query], validation.similarity[:, query])
                tensorboard_extras.write_retrieval_example(example, self.draw_retrieval_example)
        writer.flush()
        return metrics["rsum"]

    def _write_projector(self, stage: int, step: int) -> None:
        """The validation embeddings at the stage's end for TensorBoard's projector."""
        if not self.chief:
            return
        split = self.config.validation_split
        validation = self.validator.last_at(stage, step)
        split_embeddings = (validation.split_embeddings if validation
                            else self.embedder(self.config.shard_dir, split))
        tensorboard_extras.write_projector(
            os.path.join(self.config.model_dir, "logs", f"stage{stage}", "validation"),
            split_embeddings, self._caption_texts(split),
            min(self.config.projector_images, len(split_embeddings.image)), self._summary_step(step))

    # ---- the whole run ---------------------------------------------------------------

    def final_results(self, stage: int, done: dict) -> dict:
        """Metrics of the stage's best-by-validation checkpoint (its last one with
        results_checkpoint="last" or without a validation split) on the validation split
        and, when asked and present, the test split."""
        config = self.config
        chosen = run_layout.checkpoint_path(config.model_dir, stage, done, config.results_checkpoint)
        run_layout.load_checkpoint(self.model, chosen)
        results = {"checkpoint": chosen, "stage": stage, "metrics": {},
                   "validation_curve": list(self.validator.curve)}
        splits = [config.validation_split] if self.has_validation else []
        if config.evaluate_test and self._has_split(config.test_split):
            splits.append(config.test_split)
        elif config.evaluate_test:
            logging.warning("no %r split in %s: test results skipped", config.test_split,
                            config.shard_dir)
        validated = self.validator.last_at(stage, done["step"])
        for split in splits:
            if (split == config.validation_split and validated
                    and os.path.basename(chosen) == done["final_checkpoint"]):
                # The end-of-stage validation embedded these very weights: not again.
                results["metrics"][split] = validated.metrics
            else:
                results["metrics"][split] = self.evaluate(split)[0]
        return results

    def train(self) -> dict:
        """Runs the configured stages, then writes the final results and returns them."""
        done = None
        for stage in self.config.stages:
            done = self.run_stage(stage)
        last_stage = self.config.stages[-1].stage
        results = self.final_results(last_stage, done)
        if results["metrics"]:
            logging.info("final retrieval results of stage %d, %s: %s", last_stage,
                         results["checkpoint"], ", ".join(
                             f"{split} rsum {metrics['rsum']:.2f}"
                             for split, metrics in results["metrics"].items()))
        if self.chief:
            run_layout.write_json_atomically(
                os.path.join(self.config.model_dir, run_layout.RESULTS_NAME), results)
        return results


def reestimate_batch_norm_on_training_views(backbone: keras.Model, config: TrainConfig,
                                           from_layer: int, batch_size: int) -> int:
    """Sets the moving statistics of backbone's BatchNorm layers from its leaf layer
    `from_layer` on (`image_path.first_trainable_layer`) from one augmented view of every
    training image of the run's shards, in full batches of batch_size (the stage's whose
    statistics they stand for), with the run's seed and flip
    (`input_pipeline.batch_norm_view_batches`, `image_path.reestimate_batch_norm_statistics`):
    what the trainer does for precise BN and before stage I, and dual-path-evaluate
    --precise_bn_blocks on a finished run. Returns the number of batches averaged."""
    return image_path.reestimate_batch_norm_statistics(
        backbone,
        input_pipeline.batch_norm_view_batches(
            config.shard_dir, batch_size=batch_size, image_size=config.model.image_size,
            seed=config.seed, flip=config.flip),
        from_layer=from_layer)


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None,
          draw_retrieval_example: tensorboard_extras.DrawRetrievalExample | None = None) -> dict:
    """Trains config's stages under `strategy` (default: the current one); returns the results
    (results.json's contents). draw_retrieval_example: see Trainer.

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
        return Trainer(config, strategy, draw_retrieval_example).train()
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
