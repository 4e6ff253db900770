"""What a training run writes into its model_dir, and a trained model read back from it.

Layout (WORKSPACE.md has the whole workspace):
  flags.txt                  the command's resolved flags (experiments/train.py; a valid --flagfile)
  config.json                the resolved `dual_path.config.TrainConfig` tree, model included:
                             evaluation, export and the benchmarks rebuild the run from it
  stage{N}/ckpt-<step>       checkpoints; stage{N}/best/ the best by validation rsum
  stage{N}/done              JSON marker written once the stage finished: final_checkpoint,
                             best_checkpoint (relative to stage{N}/), step, epoch, best_rsum
  results.json               the final validation (and test) metrics
"""
import dataclasses
import json
import os

import tensorflow as tf

from dual_path.atomic_write import write_atomically
from dual_path.config import (CHECKPOINT_CHOICES, STAGES, DualPathConfig, TrainConfig, from_dict,
                              to_dict)
from dual_path.model import DualPath, build_dual_path

DONE_MARKER = "done"
BEST_DIR = "best"
RESULTS_NAME = "results.json"
RUN_CONFIG_NAME = "config.json"
RUN_FLAGS_NAME = "flags.txt"
OLD_MODEL_CONFIG_NAME = "model_config.json"
"""What runs wrote before config.json (with flags.json): named in load_run_config's error."""


def write_json_atomically(path: str, value) -> None:
    """Writes JSON to path.tmp, then renames it over path: readers see old or new, whole."""
    write_atomically(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_run_flags(model_dir: str, flagfile_text: str) -> None:
    """model_dir/flags.txt: the command's resolved flags, an absl flagfile (rerun with --flagfile)."""
    tf.io.gfile.makedirs(model_dir)
    write_atomically(os.path.join(model_dir, RUN_FLAGS_NAME), flagfile_text.encode("utf-8"))


def save_run_config(config: TrainConfig) -> None:
    """config.model_dir/config.json: the run's whole config tree (`dual_path.config.to_dict`)."""
    tf.io.gfile.makedirs(config.model_dir)
    write_json_atomically(os.path.join(config.model_dir, RUN_CONFIG_NAME), to_dict(config))


def load_run_config(model_dir: str) -> TrainConfig:
    """The TrainConfig a run saved in model_dir/config.json.

    Raises:
      FileNotFoundError: there is no config.json (not a dual-path model_dir).
      ValueError: it cannot be read as a TrainConfig (names the file and the reason).
    """
    path = os.path.join(model_dir, RUN_CONFIG_NAME)
    if not tf.io.gfile.exists(path) and tf.io.gfile.exists(os.path.join(model_dir, OLD_MODEL_CONFIG_NAME)):
        raise FileNotFoundError(
            f"{path} does not exist: {model_dir} was trained by an earlier dual-path (it has "
            f"{OLD_MODEL_CONFIG_NAME}). Run its training command again, `dual-path-train "
            f"--flagfile={os.path.join(model_dir, RUN_FLAGS_NAME)}`: finished stages are not "
            "trained again, and it writes config.json")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {model_dir} is not a dual-path model_dir")
    try:
        with tf.io.gfile.GFile(path, "r") as config_file:
            return from_dict(TrainConfig, _per_stage_optimizer(json.loads(config_file.read())))
    except (tf.errors.OpError, UnicodeDecodeError, json.JSONDecodeError, TypeError,
            ValueError) as error:
        raise ValueError(f"{path}: cannot read the run's config: {error}") from error


def _per_stage_optimizer(values: dict) -> dict:
    """A config.json's values with the run-wide `optimizer` of one written before each stage
    chose its own (StageConfig.optimizer) moved into each of its stages."""
    if "optimizer" not in values:
        return values
    values = dict(values)
    optimizer = values.pop("optimizer")
    values["stages"] = [{"optimizer": optimizer, **stage} for stage in values.get("stages", [])]
    return values


def load_model_config(model_dir: str) -> DualPathConfig:
    """The architecture of the run in model_dir (its config.json's model)."""
    return load_run_config(model_dir).model


def stage_dir(model_dir: str, stage: int) -> str:
    return os.path.join(model_dir, f"stage{stage}")


def read_done_marker(model_dir: str, stage: int) -> dict | None:
    """The stage's done marker ({"final_checkpoint", "step", "epoch", ...}) or None."""
    path = os.path.join(stage_dir(model_dir, stage), DONE_MARKER)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as marker:
        return json.loads(marker.read())


def checkpoint_path(model_dir: str, stage: int, done: dict, which: str = "best") -> str:
    """The finished stage's best-by-validation checkpoint ("best", when it has one) or its
    final one ("last", or "best" without validation)."""
    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_CHOICES}, got {which!r}")
    directory = stage_dir(model_dir, stage)
    if which == "best" and done.get("best_checkpoint"):
        return os.path.join(directory, done["best_checkpoint"])
    return os.path.join(directory, done["final_checkpoint"])


def latest_finished_stage(model_dir: str) -> tuple[int, dict]:
    """The last stage with a done marker, and its marker."""
    for stage in reversed(STAGES):
        done = read_done_marker(model_dir, stage)
        if done is not None:
            return stage, done
    raise FileNotFoundError(f"{model_dir}: no finished training stage (no stage*/{DONE_MARKER})")


def load_checkpoint(model: DualPath, path: str) -> None:
    """Restores the training model's weights from a trainer checkpoint (optimizer state ignored)."""
    tf.train.Checkpoint(model=model.training_model).read(path).expect_partial() \
        .assert_existing_objects_matched()


def restore(model_dir: str, which: str = "best") -> tuple[DualPath, str]:
    """Rebuilds the model of model_dir and restores its last finished stage's checkpoint.

    which: "best" or "last" (see checkpoint_path). The backbone is built without
    pretrained weights, since the checkpoint holds them. Returns the model and the
    checkpoint path it was restored from.
    """
    config = load_model_config(model_dir)
    model = build_dual_path(dataclasses.replace(config, weights=None))
    stage, done = latest_finished_stage(model_dir)
    path = checkpoint_path(model_dir, stage, done, which)
    load_checkpoint(model, path)
    return model, path
