"""Shared fixtures: tiny synthetic shard folders, and a tiny trained run that evaluation,
export and search tests start from.

`synthetic_shards` is a factory: each test file's fixture calls it with its own sizes and
seed to get a synthetic dataset (data_prep.synthetic) and its shards (build_shards), both
written by the real data_prep code.

`trained_run` builds a synthetic dataset with the real data_prep code (train, val and test
splits of 32x32 images), writes its shards, and trains a tiny model for both stages (one
epoch of 5 steps each) with `dual_path.training.train`, once per test session. The run is
a real model_dir (model_config.json, stage1/ and stage2/ checkpoints with done markers and
best/ checkpoints, results.json with val and test metrics) except that it has no
flags.txt / flags.json: those are written by experiments/train.py, not by training.train.
Its evaluation settings follow experiments/configs/synthetic.flags (no image flip, since
the captions say left and right; caption embeddings summed over positions): see
TRAINED_RUN_FLIP_IMAGES and TRAINED_RUN_SHIFT_TEXTS.
"""
from typing import Callable, NamedTuple

import pytest

from data_prep import build_shards, synthetic
from data_prep.readers import read_source
from dual_path import training
from dual_path.model import DualPathConfig

TRAINED_RUN_IMAGE_SIZE = 32
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


def _stage(number: int) -> training.StageConfig:
    return training.StageConfig(
        stage=number, epochs=1, lr_values=(0.1,), lr_boundaries=(),
        loss_weights=training.LossWeights.parse("0:1:1" if number == 1 else "1:1:1"),
        train_backbone=number == 2, backbone_lr_multiplier=1.0)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Callable[..., SyntheticShards]:
    """A factory make(name, *, num_train, num_val, num_test=0, image_size=32, seed=0).

    Each call writes a synthetic dataset of that many images per split (square JPEGs of
    image_size pixels, scenes drawn with seed) under a new temporary folder named after
    name, and builds shards of its train and val splits (and test, when num_test > 0) in
    2 image shards and 1 caption shard per split, with 16-dimensional word2vec vectors.
    """

    def make(name: str, *, num_train: int, num_val: int, num_test: int = 0, image_size: int = 32,
             seed: int = 0) -> SyntheticShards:
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
    """A tiny synthetic dataset and a tiny model trained on it (a few seconds on CPU)."""
    data = synthetic_shards("trained_run_data", num_train=_NUM_TRAIN, num_val=_NUM_VAL,
                            num_test=_NUM_TEST, image_size=TRAINED_RUN_IMAGE_SIZE, seed=0)
    manifest = data.manifest
    model = DualPathConfig(
        vocab_size=manifest["vocab_size"], num_classes=manifest["num_classes"],
        max_length=manifest["max_length"], backbone="small_cnn", weights=None,
        image_size=TRAINED_RUN_IMAGE_SIZE, small_cnn_widths=(8, 16), embedding_dim=16,
        text_blocks=(1, 1), text_widths=(16, 32), head_dims=(16, 16), dropout=0.5)
    model_dir = str(tmp_path_factory.mktemp("trained_run") / "run")
    training.train(training.TrainConfig(
        model_dir=model_dir, shard_dir=data.shard_dir, model=model, stages=[_stage(1), _stage(2)],
        batch_size=_BATCH, log_every_steps=5, eval_flip_images=TRAINED_RUN_FLIP_IMAGES,
        eval_shift_texts=TRAINED_RUN_SHIFT_TEXTS, evaluate_test=True, projector_images=4))
    return TrainedRun(shard_dir=data.shard_dir, model_dir=model_dir)
