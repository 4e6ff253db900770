"""Shared fixtures: a tiny trained run that evaluation, export and search tests start from.

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
import json
from pathlib import Path
from typing import NamedTuple

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
def trained_run(tmp_path_factory) -> TrainedRun:
    """A tiny synthetic dataset and a tiny model trained on it (a few seconds on CPU)."""
    root = tmp_path_factory.mktemp("trained_run")
    captions = synthetic.generate(str(root / "raw"), num_train=_NUM_TRAIN, num_val=_NUM_VAL,
                                  num_test=_NUM_TEST, image_size=TRAINED_RUN_IMAGE_SIZE, seed=0)
    shard_dir = str(root / "shards")
    build_shards.build_shards(read_source("karpathy", captions=captions), shard_dir,
                              splits=("train", "val", "test"), num_image_shards=2,
                              num_caption_shards=1, num_workers=1, embedding_dim=16)
    manifest = json.loads(Path(shard_dir, "manifest.json").read_text())
    model = DualPathConfig(
        vocab_size=manifest["vocab_size"], num_classes=manifest["num_classes"],
        max_length=manifest["max_length"], backbone="small_cnn", weights=None,
        image_size=TRAINED_RUN_IMAGE_SIZE, small_cnn_widths=(8, 16), embedding_dim=16,
        text_blocks=(1, 1), text_widths=(16, 32), head_dims=(16, 16), dropout=0.5)
    model_dir = str(root / "run")
    training.train(training.TrainConfig(
        model_dir=model_dir, shard_dir=shard_dir, model=model, stages=[_stage(1), _stage(2)],
        batch_size=_BATCH, log_every_steps=5, eval_flip_images=TRAINED_RUN_FLIP_IMAGES,
        eval_shift_texts=TRAINED_RUN_SHIFT_TEXTS, evaluate_test=True, projector_images=4))
    return TrainedRun(shard_dir=shard_dir, model_dir=model_dir)
