"""The experiment config tree, declared once: the model, the stages and the run around them.

  TrainConfig                    a whole run: data, losses, optimisation, checkpoints, evaluation
    .model:  DualPathConfig      the architecture (sizes from the shards, the rest from settings)
    .stages: [StageConfig, ...]  what differs between stage I and stage II

Every field is declared with `setting` (default and help text) or, where the shards decide it,
with `from_shards`. experiments/config_flags.py derives the command line from these
declarations (one absl flag per field, named after it; a StageConfig field gets one flag per
stage, `stage{N}_<field>`, for the stages its declaration names), so a hyperparameter is
written here and nowhere else. A run saves its resolved tree as model_dir/config.json
(`to_dict`, `run_layout.save_run_config`); evaluation, export and the benchmarks read it back
(`from_dict`, `run_layout.load_run_config`).
"""
import dataclasses
import math
import types
import typing
from typing import Any, Callable, Mapping, Sequence

from dual_path import instance_classifier, optimization

STAGES = (1, 2)
EMBEDDING_POINTS = ("bn", "relu", "dropout")
WORD_EMBEDDING_INITS = ("word2vec", "random")
FLIP_MODES = ("swap_left_right", "plain", "off")
LR_BOUNDARY_UNITS = ("epochs", "steps")
CHECKPOINT_CHOICES = ("best", "last")
BACKBONE_BN_STATISTICS = ("pretrained", "training_views", "training_views_stage2_top")
REQUIRED = dataclasses.MISSING
"""setting()'s default of a field without one: its flag is required."""


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None,
            lower_bound: int | None = None, flag_default: Any = dataclasses.MISSING,
            parse: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field that is also a command-line flag (experiments/config_flags.py).

    default: the field's default, or REQUIRED.
    help: what the setting does, with its unit and the paper's value where it has one.
    choices: the allowed strings (an enum flag). lower_bound: of an integer flag.
    flag_default: the flag's default where it differs from the field's (a None that means
      "take it from elsewhere", e.g. from the shards). parse: flag value -> field value, for a
      flag whose values are not the field's (e.g. "none" -> None).
    """
    metadata = {"help": help, "choices": choices, "lower_bound": lower_bound, "parse": parse,
                "flag_default": None if default is REQUIRED else
                default if flag_default is dataclasses.MISSING else flag_default}
    return dataclasses.field(default=default, metadata=metadata)


def stage_setting(help: str, per_stage: Mapping[int, Any], *, default: Any = dataclasses.MISSING,
                  lower_bound: int | None = None, parse: Callable[[Any], Any] | None = None,
                  choices: Sequence[str] | None = None) -> Any:
    """A StageConfig field with a flag `stage{N}_<field>` for each stage N in per_stage, whose
    value there is that flag's default; stages not in per_stage take `default`. choices: the
    allowed strings (an enum flag)."""
    metadata = {"help": help, "per_stage": dict(per_stage), "lower_bound": lower_bound,
                "parse": parse, "choices": choices}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def from_shards(help: str, default: Any = dataclasses.MISSING) -> Any:
    """A field whose value comes from the shards' manifest.json (no flag of its own)."""
    metadata = {"help": help, "from_shards": True}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _none_or_text(value: str) -> str | None:
    return None if value.lower() == "none" else value


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

    def __str__(self) -> str:
        """"rank:image:text", as parse takes it."""
        return f"{self.rank:g}:{self.image:g}:{self.text:g}"


@dataclasses.dataclass
class DualPathConfig:
    """Every hyperparameter of the model architecture (`dual_path.model.build_dual_path`)."""

    vocab_size: int = from_shards("Number of token ids, reserved ones included (Vocabulary.size).")
    num_classes: int = from_shards(
        "C: one class per training image (instance loss): the classifier's output size.")
    max_length: int = from_shards("L: token ids per caption, padded with 0 (the original: 32).", 32)

    backbone: str = setting("ResNet50", "keras.applications constructor name, or small_cnn.")
    weights: str | None = setting(
        "imagenet", "Backbone weights: imagenet, none (random), or a weights file (.h5 or "
        ".weights.h5).", parse=_none_or_text)
    image_size: int = setting(224, "S: the side of the square input image, pixels.")
    alpha: float | None = setting(None, "Width multiplier of MobileNet / V2 / V3; none: the default.")
    small_cnn_widths: Sequence[int] = setting(
        (32, 64, 128, 256), "Channels of small_cnn's stride-2 conv blocks (backbone small_cnn only).")

    embedding_dim: int = setting(
        300, "Word vector size (word2vec's: 300); default: the shards' (manifest.json's "
        "embedding.dim, the width of word2vec_init.npy). A different value is an error.",
        flag_default=None)
    embedding_lr_multiplier: float = setting(1e-3, "lr multiplier of the word embedding.")
    text_blocks: Sequence[int] = setting((3, 4, 6, 1), "Residual bottleneck blocks per text CNN stage.")
    text_widths: Sequence[int] = setting(
        (256, 512, 1024, 2048), "Output channels per text CNN stage; the bottleneck is a quarter.")

    head_dims: Sequence[int] = setting(
        (2048, 2048), "Sizes of each path's fc -> BN -> ReLU head layers; D is the last.")
    dropout: float = setting(
        0.75, "Dropout before the classifier: 0.75 Flickr30k, 0.5 MSCOCO, 0.8 CUHK-PEDES.")
    embedding_point: str = setting(
        "bn", "Where the retrieval embedding is taken: after the last BN (the original's), after "
        "the last ReLU, or the classifier's input (dropout).", choices=EMBEDDING_POINTS)

    share_classifier: bool = setting(
        True, "One instance classifier W for both paths (the paper); off gives each its own.")
    classifier_bias: bool = setting(False, "Whether the instance classifier has a bias (dense only).")
    classifier: str = setting(
        "dense", "Instance classifier W: dense (the paper's) or cosine (scaled cosine softmax, "
        "NormFace; dual_path.instance_classifier).", choices=instance_classifier.CLASSIFIERS)
    classifier_scale: float = setting(16.0, "s of the cosine classifier: its logits lie in [-s, s].")
    classifier_lr_multiplier: float = setting(1.0, "lr multiplier of the instance classifier.")

    def __post_init__(self):
        if self.embedding_point not in EMBEDDING_POINTS:
            raise ValueError(f"embedding_point must be one of {EMBEDDING_POINTS}, "
                             f"got {self.embedding_point!r}")
        if not self.head_dims:
            raise ValueError("head_dims must name at least one fc layer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.classifier not in instance_classifier.CLASSIFIERS:
            raise ValueError(f"classifier must be one of {instance_classifier.CLASSIFIERS}, "
                             f"got {self.classifier!r}")
        if self.classifier == "cosine" and self.classifier_bias:
            raise ValueError("a cosine classifier has no bias: drop classifier_bias")
        if not self.classifier_scale > 0 or self.classifier_lr_multiplier < 0:
            raise ValueError(f"classifier_scale must be > 0 and classifier_lr_multiplier >= 0, got "
                             f"{self.classifier_scale} and {self.classifier_lr_multiplier}")


def shard_sizes(manifest: Mapping[str, Any]) -> dict[str, int]:
    """DualPathConfig's from_shards fields out of a shard folder's manifest.json:
    {"vocab_size", "num_classes", "max_length", "embedding_dim"} (the word vectors' width)."""
    return {"vocab_size": int(manifest["vocab_size"]), "num_classes": int(manifest["num_classes"]),
            "max_length": int(manifest["max_length"]),
            "embedding_dim": int(manifest["embedding"]["dim"])}


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """What differs between the two stages."""

    stage: int
    epochs: int = stage_setting("Epochs of the stage.", {1: 240, 2: 60})
    lr_values: Sequence[float] = stage_setting(
        "Learning rates, one more than the boundaries.", {1: (0.1,), 2: (0.1, 0.01)})
    lr_boundaries: Sequence[float] = stage_setting(
        "Where the next learning rate starts, in TrainConfig.lr_boundary_unit.", {1: (), 2: (40.0,)})
    loss_weights: LossWeights = stage_setting(
        "Loss weights rank:image:text (the paper's lambdas).",
        {1: LossWeights.parse("0:1:1"), 2: LossWeights.parse("1:1:1")}, parse=LossWeights.parse)
    train_backbone: bool = stage_setting(
        "Train the image backbone; off freezes its weights and BatchNorm statistics (the paper's "
        "stage I; train it there only for a backbone without pretrained weights).",
        {1: False}, default=True)
    backbone_lr_multiplier: float = stage_setting(
        "lr multiplier of the backbone's trained weights (the original's stage II: 0.02).",
        {2: 0.02}, default=1.0)
    backbone_bn_lr_multiplier: float | None = stage_setting(
        "lr multiplier of the backbone's BatchNorm scales and offsets (the original's: 0.001; "
        "the moving statistics of a trained BN follow Keras' momentum, not an lr); default: the "
        "backbone's.", {2: None}, default=None)
    backbone_bn_frozen: bool = stage_setting(
        "Keep the trained backbone's BatchNorm layers frozen: they normalise with their moving "
        "statistics, which stay as they are, and their scales and offsets do not train (Keras' "
        "fine-tuning advice), so the trained blocks see the features stage I's cached ones came "
        "from; off, they normalise with batch statistics and train (the original's).",
        {2: False}, default=False)
    first_conv_lr_multiplier: float | None = stage_setting(
        "lr multiplier of the backbone's first conv kernel (the original's: 1e-4); default: the "
        "backbone's.", {2: None}, default=None)
    backbone_trainable_from: str | None = stage_setting(
        "Train the backbone from this layer on (a keras.applications layer name, e.g. "
        "block_13_expand), the layers below frozen with their BN statistics "
        "(image_path.train_top_of_backbone); default: all of it.", {2: None}, default=None)
    backbone_trainable_blocks: int | None = stage_setting(
        "Train only the backbone's last N blocks (block_16, conv5_block3, ...) and the layers "
        "after them, the rest frozen with their BN statistics (0: all of it frozen); default: "
        "all of it trains.", {2: None}, default=None, lower_bound=0)
    hardest_negative: bool | None = stage_setting(
        "The ranking loss on the hardest negative (or, --no..., the sum over the batch's); "
        "default: --hardest_negative.", {2: None}, default=None)
    precise_bn: bool = stage_setting(
        "At each validation interval's end (and the stage's), before validating and saving, set "
        "the moving statistics of the trained backbone's BatchNorm layers to their mean batch "
        "statistics over one augmented view of every training image (precise BN; "
        "image_path.reestimate_batch_norm_statistics), in place of Keras' moving average, which "
        "lags the weights and, with MobileNetV2's momentum 0.999, still holds ImageNet's after "
        "a short stage.", {2: False}, default=False)
    weight_average_momentum: float | None = stage_setting(
        "Keep an exponential moving average of the trained weights with this momentum (Keras' "
        "optimizer use_ema: average <- m * average + (1 - m) * weight after each step); "
        "validation uses the averages, and at the stage's end, before precise BN and the final "
        "checkpoint, they replace the weights (optimization.averaged_weights); default: none.",
        {2: None}, default=None)
    optimizer: str = stage_setting(
        "matconvnet_sgd (the original's), or Keras adam / adamw; all keep the lr multipliers. "
        "Every stage builds a fresh one.", {1: "matconvnet_sgd", 2: "matconvnet_sgd"},
        default="matconvnet_sgd", choices=optimization.OPTIMIZERS)
    batch_size: int | None = stage_setting(
        "Global batch size of the stage (all replicas together), its epochs counted in its own "
        "steps; default: --batch_size.", {2: None}, default=None, lower_bound=1)
    feature_views: int = stage_setting(
        "With a frozen backbone: train on its cached features of this many augmented views per "
        "image, computed once, one drawn per image and epoch (dual_path.feature_cache); 0 runs "
        "the backbone on a fresh crop every step.", {1: 0}, default=0)

    def global_batch_size(self, run_batch_size: int) -> int:
        """The stage's global batch size: its own batch_size, else the run's (TrainConfig's)."""
        return run_batch_size if self.batch_size is None else self.batch_size


def stage_defaults(number: int) -> StageConfig:
    """Stage `number` with every field at its per-stage default (the flags' defaults)."""
    values = {}
    for field in dataclasses.fields(StageConfig):
        per_stage = field.metadata.get("per_stage", {})
        if number in per_stage:
            values[field.name] = per_stage[number]
    return StageConfig(stage=number, **values)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run; experiments/train.py fills it from flags (experiments/config_flags.py)."""

    model_dir: str = setting(REQUIRED, "Checkpoints, logs, config and results of this run.")
    shard_dir: str = setting(REQUIRED, "Folder of the dataset's shards, vocab.txt, manifest.json.")
    model: DualPathConfig
    stages: Sequence[StageConfig]
    batch_size: int = setting(32, "Global batch size (all replicas together).")
    seed: int = setting(0, "Seed of the data order and augmentation.")
    flip: str = setting("swap_left_right", "Horizontal flips of training images (and left/right "
                        "in their captions); input_pipeline's flip mode.", choices=FLIP_MODES)
    position_shift: bool = setting(True, "Random caption position in its max_length slots.")
    margin: float = setting(1.0, "Ranking loss margin (cosine units).")
    hardest_negative: bool = setting(
        True, "Ranking loss on the hardest negative; else the sum over the batch's negatives.")
    momentum: float = setting(0.9, "SGD (Nesterov) momentum.")
    weight_decay: float = setting(1e-4, "L2 weight decay added to the gradient.")
    lr_boundary_unit: str = setting("epochs", "Unit of the stages' lr boundaries.",
                                    choices=LR_BOUNDARY_UNITS)
    mixed_precision: bool = setting(
        False, "mixed_float16 with dynamic loss scaling (mixed_bfloat16 on TPU).")
    checkpoint_every_steps: int = setting(
        1000, "Also checkpoint every N steps inside an epoch (0: at epoch ends only).")
    keep_checkpoints: int = setting(3, "Checkpoints kept per stage (besides the best).")
    log_every_steps: int = setting(50, "One progress line and summaries every N steps.")
    steps_per_loop: int = setting(
        50, "Training steps per tf.function call, the losses averaged on the device (as "
        "Orbit's steps_per_loop; a call also ends at every log, checkpoint and epoch boundary).")
    validation_split: str = setting("val", "Split validated every epoch (best checkpoint).")
    validate_every_epochs: int = setting(1, "Validate every N epochs (and at each stage's end).")
    eval_flip_images: bool = setting(
        True, "Add the mirrored image's embedding (off where captions say left/right).")
    eval_shift_texts: bool = setting(False, "Sum caption embeddings over all positions.")
    eval_folds: int = setting(1, "Evaluate on k folds of the images and average (COCO 1K: 5).")
    evaluate_test: bool = setting(False, "Also report the test split at the end, if present.")
    test_split: str = "test"
    results_checkpoint: str = setting(
        "best", "Final results from the best-by-validation or the last checkpoint (use last "
        "when the validation split is the test set).", choices=CHECKPOINT_CHOICES)
    projector_images: int = setting(
        500, "Validation images (with their captions) in the end-of-stage projector embeddings.")
    feature_cache_dir: str | None = setting(
        None, "Where cached backbone features are kept (default model_dir/feature_cache); runs "
        "on the same images and backbone can share it.")
    stage1_from: str | None = setting(
        None, "With stage II alone: start from the finished stage I of this other run (its "
        "model_dir) instead of model_dir's own.")
    backbone_bn_statistics: str = setting(
        "pretrained", "The backbone's BatchNorm moving statistics from a fresh stage I on: "
        "pretrained (its weights', ImageNet's); training_views: re-estimated first as the mean "
        "batch statistics of one augmented view of every training image, in batches of "
        "batch_size (image_path.reestimate_batch_norm_statistics), so that the frozen backbone "
        "normalises as MatConvNet's stage I does, with batch statistics; "
        "training_views_stage2_top: only those of the top stage II trains with batch statistics, "
        "so that stage II starts from the features stage I learnt on. Stage I's feature cache, "
        "evaluation and checkpoints hold them.", choices=BACKBONE_BN_STATISTICS)
    word_embedding_init: str = setting(
        "word2vec", "word2vec: the shard folder's word2vec_init.npy (random where it is absent); "
        "random: Keras' default init.", choices=WORD_EMBEDDING_INITS)
    label_smoothing: float = setting(0.0, "Label smoothing of both instance losses.")
    classifier_init: str = setting(
        "random", "random (the layer's initializer), or imprint: at the start of a fresh stage I, "
        "W's columns are set from the image head's features of each class's training images "
        "(instance_classifier.imprint).", choices=instance_classifier.CLASSIFIER_INITS)

    def stage_batch_size(self, stage: StageConfig) -> int:
        """The stage's global batch size (StageConfig.global_batch_size of this run's)."""
        return stage.global_batch_size(self.batch_size)

    def __post_init__(self):
        for batch_size in (self.batch_size, *(stage.batch_size for stage in self.stages)):
            if batch_size is not None and batch_size < 1:
                raise ValueError(f"batch_size must be positive, got {batch_size}")
        numbers = [stage.stage for stage in self.stages]
        if not numbers or numbers != sorted(set(numbers)) or not set(numbers) <= set(STAGES):
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
            if stage.precise_bn and (not stage.train_backbone or stage.backbone_bn_frozen
                                     or stage.backbone_trainable_blocks == 0):
                raise ValueError(f"stage {stage.stage}: precise_bn re-estimates the statistics of "
                                 f"the BatchNorm layers the stage trains, but it trains none "
                                 f"(train_backbone {stage.train_backbone}, backbone_bn_frozen "
                                 f"{stage.backbone_bn_frozen}, backbone_trainable_blocks "
                                 f"{stage.backbone_trainable_blocks})")
            if stage.weight_average_momentum is not None and not 0.0 < stage.weight_average_momentum < 1.0:
                raise ValueError(f"stage {stage.stage}: weight_average_momentum must be in (0, 1), "
                                 f"got {stage.weight_average_momentum}")
            if stage.optimizer not in optimization.OPTIMIZERS:
                raise ValueError(f"stage {stage.stage}: optimizer must be one of "
                                 f"{optimization.OPTIMIZERS}, got {stage.optimizer!r}")
            if stage.backbone_bn_frozen and stage.backbone_bn_lr_multiplier is not None:
                raise ValueError(f"stage {stage.stage}: the backbone's BatchNorm layers are frozen "
                                 f"(backbone_bn_frozen), so they take no lr multiplier (got "
                                 f"{stage.backbone_bn_lr_multiplier})")
        if self.backbone_bn_statistics == "training_views_stage2_top" and (
                numbers != [1, 2] or self.stages[1].backbone_bn_frozen
                or not self.stages[1].train_backbone):
            raise ValueError("backbone_bn_statistics training_views_stage2_top sets the statistics "
                             "of the top stage II trains with batch statistics: run both stages, "
                             "stage II training the backbone with its BatchNorm not frozen")
        if self.stage1_from and numbers != [2]:
            raise ValueError(f"stage1_from ({self.stage1_from}) starts stage II from another run's "
                             f"stage I: train stage 2 only, not stages {numbers}")
        for name in ("flip", "lr_boundary_unit", "results_checkpoint", "word_embedding_init",
                     "classifier_init", "backbone_bn_statistics"):
            choices = next(field.metadata["choices"] for field in dataclasses.fields(self)
                           if field.name == name)
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {tuple(choices)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.log_every_steps < 1 or self.checkpoint_every_steps < 0:
            raise ValueError("log_every_steps must be >= 1 and checkpoint_every_steps >= 0")
        if self.steps_per_loop < 1:
            raise ValueError(f"steps_per_loop must be >= 1, got {self.steps_per_loop}")


def to_dict(config) -> dict:
    """A config dataclass (the tree under it included) as JSON-ready values."""
    return dataclasses.asdict(config)


def _value(kind, value):
    """value (as to_dict and json wrote it) as the field type `kind` holds it."""
    if value is None:
        return None
    if isinstance(kind, types.UnionType):  # X | None
        (kind,) = [part for part in typing.get_args(kind) if part is not type(None)]
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value)
    if origin is not None and issubclass(origin, Sequence) and not isinstance(value, str):
        (item,) = typing.get_args(kind)
        return tuple(_value(item, part) for part in value)
    return value


def from_dict(cls, values: Mapping[str, Any]):
    """The dataclass `cls` (TrainConfig, DualPathConfig, StageConfig, ...) from to_dict's dict.

    Raises:
      ValueError: a key is not a field of cls (names it), or a field's value is invalid.
    """
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"not fields of {cls.__name__}: {', '.join(unknown)}")
    return cls(**{name: _value(hints[name], value) for name, value in values.items()})
