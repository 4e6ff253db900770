"""A stage's checkpoints (dual_path/checkpointing.py): save, best, resume, done marker, and
nothing saved from non-finite weights."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dual_path import checkpointing, run_layout


def stage_checkpoints(model_dir: str, stage: int, weight: tf.Variable):
    """A one-weight model's stage checkpoints, with fresh stage variables."""
    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1, use_bias=False, name="dense")(inputs))
    model.get_layer("dense").kernel.assign(weight.numpy().reshape(1, 1))
    variables = checkpointing.StageVariables.create(stage, tf.Variable(0, dtype=tf.int64))
    finite = lambda: tf.reduce_all(tf.math.is_finite(model.get_layer("dense").kernel))  # noqa: E731
    checkpoints = checkpointing.StageCheckpoints(
        model_dir, stage, model, keras.optimizers.SGD(0.1), variables, keep=2,
        write_dir=lambda path: path, weights_are_finite=finite)
    return model, variables, checkpoints


def test_resume_takes_the_larger_best_rsum_of_the_latest_and_the_best_checkpoint(tmp_path):
    """Killed after a new best was saved and before the next full checkpoint: the resumed
    stage must not forget that best (it would overwrite best/ with a worse one)."""
    model_dir = str(tmp_path)
    _, variables, checkpoints = stage_checkpoints(model_dir, 1, tf.Variable([1.0]))
    variables.step.assign(10)
    checkpoints.save(10)                       # best_rsum -1 in the full checkpoint
    variables.step.assign(20)
    variables.best_rsum.assign(55.0)
    checkpoints.save_best(20)                  # then killed before the next save
    _, resumed, again = stage_checkpoints(model_dir, 1, tf.Variable([0.0]))
    assert again.restore_latest() == os.path.join(run_layout.stage_dir(model_dir, 1), "ckpt-10")
    assert int(resumed.step.numpy()) == 10 and float(resumed.best_rsum.numpy()) == 55.0


def test_a_checkpoint_of_another_stage_is_refused(tmp_path):
    _, variables, checkpoints = stage_checkpoints(str(tmp_path), 1, tf.Variable([1.0]))
    checkpoints.save(3)
    os.rename(run_layout.stage_dir(str(tmp_path), 1), run_layout.stage_dir(str(tmp_path), 2))
    _, _, other = stage_checkpoints(str(tmp_path), 2, tf.Variable([1.0]))
    with pytest.raises(ValueError, match="holds stage 1, not stage 2"):
        other.restore_latest()


def test_non_finite_weights_are_never_saved_and_the_error_names_the_last_good_one(tmp_path):
    model, variables, checkpoints = stage_checkpoints(str(tmp_path), 1, tf.Variable([1.0]))
    checkpoints.save(5)
    model.get_layer("dense").kernel.assign([[np.nan]])
    with pytest.raises(checkpointing.NonFiniteLossError, match="ckpt-5"):
        checkpoints.save(6)
    with pytest.raises(checkpointing.NonFiniteLossError):
        checkpoints.save_best(6)
    assert tf.train.latest_checkpoint(run_layout.stage_dir(str(tmp_path), 1)).endswith("ckpt-5")


def test_finish_saves_the_final_step_and_writes_the_done_marker(tmp_path):
    _, variables, checkpoints = stage_checkpoints(str(tmp_path), 2, tf.Variable([1.0]))
    variables.step.assign(4)
    variables.best_rsum.assign(12.5)
    checkpoints.save_best(4)
    variables.step.assign(8)
    variables.epoch.assign(2)
    done = checkpoints.finish(write=True)
    assert done == {"final_checkpoint": "ckpt-8", "step": 8, "epoch": 2, "best_rsum": 12.5,
                    "best_checkpoint": os.path.join("best", "ckpt-4")}
    marker = os.path.join(run_layout.stage_dir(str(tmp_path), 2), run_layout.DONE_MARKER)
    assert json.loads(open(marker).read()) == done
    assert checkpointing.checkpoint_number(checkpoints.latest.latest_checkpoint) == 8


def test_stage2_without_a_finished_stage1_names_the_missing_marker(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stage1/done does not exist: train stage I first"):
        checkpointing.load_stage1_final(None, str(tmp_path))
