"""What a training run writes into its model_dir, and a trained model read back from it.

Layout (WORKSPACE.md has the whole workspace):
  flags.txt, flags.json      the run's resolved flags (flags.txt is a valid --flagfile)
  model_config.json          the `DualPathConfig`: evaluation and export rebuild the model from it
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
from dual_path.model import DualPath, DualPathConfig, build_dual_path

DONE_MARKER = "done"
BEST_DIR = "best"
RESULTS_NAME = "results.json"
MODEL_CONFIG_NAME = "model_config.json"
RUN_FLAGS_NAME = "flags.json"
CHECKPOINT_CHOICES = ("best", "last")
STAGES = (1, 2)


def write_json_atomically(path: str, value) -> None:
    """Writes JSON to path.tmp, then renames it over path: readers see old or new, whole."""
    write_atomically(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_run_flags(model_dir: str, flagfile_text: str, values: dict) -> None:
    """model_dir/flags.txt (an absl flagfile: rerun with --flagfile) and flags.json."""
    tf.io.gfile.makedirs(model_dir)
    write_atomically(os.path.join(model_dir, "flags.txt"), flagfile_text.encode("utf-8"))
    write_json_atomically(os.path.join(model_dir, RUN_FLAGS_NAME), values)


def read_run_flags(model_dir: str) -> dict:
    """model_dir/flags.json as a dict, or {} when the run has none (a run not started by
    experiments/train.py). Raises ValueError naming the file when it cannot be read."""
    path = os.path.join(model_dir, RUN_FLAGS_NAME)
    if not tf.io.gfile.exists(path):
        return {}
    try:
        with tf.io.gfile.GFile(path, "r") as flags_file:
            values = json.loads(flags_file.read())
    except (tf.errors.OpError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the run's flags: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the run's flags must be a JSON object")
    return values


def save_model_config(model_dir: str, config: DualPathConfig) -> None:
    tf.io.gfile.makedirs(model_dir)
    write_json_atomically(os.path.join(model_dir, MODEL_CONFIG_NAME), dataclasses.asdict(config))


def load_model_config(model_dir: str) -> DualPathConfig:
    path = os.path.join(model_dir, MODEL_CONFIG_NAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {model_dir} is not a dual-path model_dir")
    with tf.io.gfile.GFile(path, "r") as config_file:
        values = json.loads(config_file.read())
    return DualPathConfig(**{
        name: tuple(value) if isinstance(value, list) else value for name, value in values.items()
    })


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
