"""Shared fixtures and configs: tiny synthetic shard folders, the tiny model, and a tiny trained
run that evaluation, export and search tests start from.

`synthetic_shards` is a factory: each test file's fixture calls it with its own sizes and
seed to get a synthetic dataset (data_prep.synthetic) and its shards (build_shards), both
written by the real data_prep code.

`trained_run` builds a synthetic dataset with the real data_prep code (train, val and test
splits of 32x32 images), writes its shards, and trains a tiny model for both stages (one
epoch of 5 steps each) with `dual_path.training.train`, once per test session. The run is
a real model_dir (config.json, stage1/ and stage2/ checkpoints with done markers and best/
checkpoints, results.json with val and test metrics, TensorBoard logs with the retrieval
example drawn by experiments/retrieval_example.py) except that it has no flags.txt: that is
written by experiments/train.py, not by training.train.
Its evaluation settings follow experiments/configs/synthetic.flags (no image flip, since
the captions say left and right; caption embeddings summed over positions): see
TRAINED_RUN_FLIP_IMAGES and TRAINED_RUN_SHIFT_TEXTS.

TINY_MODEL is the one tiny architecture the tests build and train: `tiny_model(...)` gives it
as a DualPathConfig and `tiny_model_flags(...)` as the command-line flags of the same model;
`tiny_stage(n, ...)` is a one-epoch StageConfig. Each takes overrides of single fields. Test
files import them (`from conftest import tiny_model`: pytest puts tests/ on sys.path).
"""
from typing import Any, Callable, Mapping, NamedTuple

import pytest

from data_prep import build_shards, synthetic
from data_prep.readers import read_source
from dual_path import training
from dual_path.config import DualPathConfig, LossWeights, StageConfig, TrainConfig
from experiments.retrieval_example import draw_retrieval_example

TINY_MODEL = {
    "backbone": "small_cnn", "weights": None, "image_size": 32, "small_cnn_widths": (8, 16),
    "embedding_dim": 16, "text_blocks": (1, 1), "text_widths": (16, 32), "head_dims": (16, 16),
    "dropout": 0.5,
}
"""The DualPathConfig fields of the tiny model (the rest at their defaults): a two-block
small_cnn on 32x32 images, 16-d word vectors (synthetic_shards' word2vec), a text CNN of two
one-block stages and 16-d heads. A test that needs another size overrides that field only."""

TRAINED_RUN_IMAGE_SIZE = TINY_MODEL["image_size"]
TRAINED_RUN_FLIP_IMAGES = False
TRAINED_RUN_SHIFT_TEXTS = True
_NUM_TRAIN, _NUM_VAL, _NUM_TEST = 40, 12, 12
_BATCH = 8  # 5 steps per epoch


class SyntheticShards(NamedTuple):
    """raw_dir: the generated dataset (images/, dataset_synthetic.json); captions: its
    dataset JSON; shard_dir: its shards (vocab.txt, manifest.json); manifest: what
    build_shards returned (the contents of manifest.json)."""

    raw_dir: str
    captions: str
    shard_dir: str
    manifest: dict


class TrainedRun(NamedTuple):
    """shard_dir: the synthetic dataset's shards (train/val/test, vocab.txt, manifest.json);
    model_dir: the finished two-stage run trained on them."""

    shard_dir: str
    model_dir: str


def tiny_model(manifest: Mapping[str, Any] | None = None, **overrides) -> DualPathConfig:
    """DualPathConfig of TINY_MODEL with `overrides`; vocab_size, num_classes and max_length
    from a shard folder's manifest (manifest.json's contents) when one is given, else from
    overrides."""
    sizes = {} if manifest is None else {
        name: manifest[name] for name in ("vocab_size", "num_classes", "max_length")}
    return DualPathConfig(**{**TINY_MODEL, **sizes, **overrides})


def tiny_model_flags(**overrides) -> list[str]:
    """TINY_MODEL with `overrides` as flags of experiments/train.py and the benchmarks:
    sequences comma-separated, None as "none"."""
    def text(value) -> str:
        if value is None:
            return "none"
        if isinstance(value, tuple):
            return ",".join(str(item) for item in value)
        return str(value)

    return [f"--{name}={text(value)}" for name, value in {**TINY_MODEL, **overrides}.items()]


def tiny_stage(number: int, weights: str | None = None, **overrides) -> StageConfig:
    """Stage `number`, one epoch at lr 0.1: stage I the instance losses alone on a frozen
    backbone, stage II all three losses training the backbone at the base lr. weights:
    "rank:image:text" in place of 0:1:1 (stage I) or 1:1:1 (stage II); `overrides` replace any
    other field."""
    weights = weights or ("0:1:1" if number == 1 else "1:1:1")
    fields = dict(stage=number, epochs=1, lr_values=(0.1,), lr_boundaries=(),
                  loss_weights=LossWeights.parse(weights), train_backbone=number == 2,
                  backbone_lr_multiplier=1.0)
    return StageConfig(**{**fields, **overrides})


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Callable[..., SyntheticShards]:
    """A factory make(name, *, num_train, num_val, num_test=0, image_size=32, seed=0).

    Each call writes a synthetic dataset of that many images per split (square JPEGs of
    image_size pixels, scenes drawn with seed) under a new temporary folder named after
    name, and builds shards of its train and val splits (and test, when num_test > 0) in
    2 image shards and 1 caption shard per split, with 16-dimensional word2vec vectors.
    """

    def make(name: str, *, num_train: int, num_val: int, num_test: int = 0,
             image_size: int = TINY_MODEL["image_size"], seed: int = 0) -> SyntheticShards:
        root = tmp_path_factory.mktemp(name)
        raw_dir, shard_dir = str(root / "raw"), str(root / "shards")
        captions = synthetic.generate(raw_dir, num_train=num_train, num_val=num_val, num_test=num_test,
                                      image_size=image_size, seed=seed)
        splits = ("train", "val", "test") if num_test else ("train", "val")
        manifest = build_shards.build_shards(read_source("karpathy", captions=captions), shard_dir,
                                             splits=splits, num_image_shards=2, num_caption_shards=1,
                                             num_workers=1, embedding_dim=16)
        return SyntheticShards(raw_dir, captions, shard_dir, manifest)

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic_shards) -> TrainedRun:
    """A tiny synthetic dataset and the tiny model trained on it (a few seconds on CPU)."""
    data = synthetic_shards("trained_run_data", num_train=_NUM_TRAIN, num_val=_NUM_VAL,
                            num_test=_NUM_TEST, image_size=TRAINED_RUN_IMAGE_SIZE, seed=0)
    model = tiny_model(data.manifest)
    model_dir = str(tmp_path_factory.mktemp("trained_run") / "run")
    training.train(TrainConfig(
        model_dir=model_dir, shard_dir=data.shard_dir, model=model,
        stages=[tiny_stage(1), tiny_stage(2)],
        batch_size=_BATCH, log_every_steps=5, eval_flip_images=TRAINED_RUN_FLIP_IMAGES,
        eval_shift_texts=TRAINED_RUN_SHIFT_TEXTS, evaluate_test=True, projector_images=4),
        draw_retrieval_example=draw_retrieval_example)
    return TrainedRun(shard_dir=data.shard_dir, model_dir=model_dir)
