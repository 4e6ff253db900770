"""Checkpoints of a training stage, and resuming from them (files: `dual_path.run_layout`).

A stage keeps two tf.train.CheckpointManagers: stage{N}/ckpt-<step> (model, optimizer, step,
epoch, stage number, best validation rsum, the dropout masks' random states; every epoch and
every checkpoint_every_steps) and stage{N}/best/ckpt-<step> (the weights with the best
validation rsum). Nothing is saved while a weight is NaN or infinite: the last checkpoint is
always the last good state (`NonFiniteLossError`). A finished stage writes its done marker.

On a multi-worker cluster only the chief writes into model_dir; the other workers save to
scratch folders inside it (the managers need every worker to save) and all resume from the
chief's checkpoints.
"""
import dataclasses
import os
from typing import Callable

import keras
import tensorflow as tf
from absl import logging

from dual_path import run_layout
from dual_path.model import DualPath


class NonFiniteLossError(RuntimeError):
    """A training loss or weight became NaN or infinite; nothing after the last good
    checkpoint was saved."""


def checkpoint_number(path: str) -> int:
    """N of a CheckpointManager path `.../ckpt-N` (the step it was saved at)."""
    return int(path.rsplit("-", 1)[1])


def random_states(model: keras.Model) -> list:
    """The model's variables that are not weights: its random seed generators' states (the
    dropout masks' stream), which Keras keeps out of the weights and so out of a checkpoint of
    the model. The stage's checkpoint saves them, so that a resumed stage draws the masks an
    uninterrupted one would."""
    weights = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


@dataclasses.dataclass
class StageVariables:
    """What a stage's checkpoints hold besides the model: int64 step (within the stage) and
    epoch (finished epochs), int64 stage number, float32 best validation rsum (-1: none yet)."""

    step: tf.Variable
    epoch: tf.Variable
    stage: tf.Variable
    best_rsum: tf.Variable

    @classmethod
    def create(cls, stage: int, step: tf.Variable) -> "StageVariables":
        """Fresh variables of stage `stage` around its step counter (call under the strategy's scope)."""
        return cls(step=step,
                   epoch=tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
                   stage=tf.Variable(stage, dtype=tf.int64, trainable=False, name="stage"),
                   best_rsum=tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_rsum"))


class StageCheckpoints:
    """The latest and the best checkpoints of one stage, its resume and its done marker."""

    def __init__(self, model_dir: str, stage: int, model: keras.Model, optimizer,
                 variables: StageVariables, *, keep: int, write_dir: Callable[[str], str],
                 weights_are_finite: Callable[[], tf.Tensor]):
        """write_dir: where this worker writes a folder (itself on the chief, a scratch copy
        elsewhere). weights_are_finite: a bool scalar, checked before every save."""
        self.directory = run_layout.stage_dir(model_dir, stage)
        self.stage = stage
        self.variables = variables
        self._weights_are_finite = weights_are_finite
        state = dict(step=variables.step, epoch=variables.epoch, stage=variables.stage,
                     best_rsum=variables.best_rsum)
        self.latest = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=model, optimizer=optimizer, random_states=random_states(model),
                                **state),
            write_dir(self.directory), max_to_keep=keep, step_counter=variables.step,
            checkpoint_name="ckpt")
        self.best = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=model, **state),
            write_dir(os.path.join(self.directory, run_layout.BEST_DIR)), max_to_keep=1,
            step_counter=variables.step, checkpoint_name="ckpt")

    @property
    def last_good(self) -> str:
        """The stage's latest full checkpoint, for error messages."""
        return self.latest.latest_checkpoint or "none (no checkpoint yet)"

    def restore_latest(self) -> str | None:
        """Restores the chief's latest checkpoint of the stage, if any, and returns its path.

        The best rsum is the larger of the checkpoint's and best/'s (the best checkpoint may be
        newer than the last full one when the run was killed in between).

        Raises:
          ValueError: the checkpoint belongs to another stage.
        """
        latest = tf.train.latest_checkpoint(self.directory)
        if not latest:
            return None
        self.latest.checkpoint.restore(latest).assert_existing_objects_matched()
        saved_stage = int(self.variables.stage.numpy())
        if saved_stage != self.stage:
            raise ValueError(f"{latest} holds stage {saved_stage}, not stage {self.stage}")
        latest_best = tf.train.latest_checkpoint(os.path.join(self.directory, run_layout.BEST_DIR))
        if latest_best:
            best_rsum = tf.Variable(-1.0, dtype=tf.float32, trainable=False)
            tf.train.Checkpoint(best_rsum=best_rsum).read(latest_best).expect_partial()
            self.variables.best_rsum.assign(
                max(float(self.variables.best_rsum.numpy()), float(best_rsum.numpy())))
        return latest

    def check_finite(self, current: int) -> None:
        """NonFiniteLossError (naming the last good checkpoint) if a weight is not finite."""
        if not bool(self._weights_are_finite()):
            raise NonFiniteLossError(
                f"a model weight is not finite after step {current}. Stopped without saving; the "
                f"last good checkpoint is {self.last_good}")

    def save(self, current: int) -> None:
        """A full checkpoint at step `current` (weights checked finite first)."""
        self.check_finite(current)
        self.latest.save(checkpoint_number=current)

    def save_best(self, current: int) -> None:
        """The best-by-validation checkpoint at step `current` (weights checked finite first)."""
        self.check_finite(current)
        self.best.save(checkpoint_number=current)

    def finish(self, write: bool, train_accuracy: dict | None = None) -> dict:
        """Saves the final step unless its checkpoint exists, then (with write: on the chief)
        writes the done marker; returns it: final_checkpoint and best_checkpoint (relative to
        the stage folder), step, epoch, best_rsum, and train_accuracy (trained path -> its train
        instance accuracy over the stage's last epoch, where given: the next stage's
        `instance_health.AccuracyCollapse` starts from it)."""
        final_step = int(self.variables.step.numpy())
        latest = self.latest.latest_checkpoint
        if latest is None or checkpoint_number(latest) != final_step:
            self.save(final_step)
        best = self.best.latest_checkpoint
        done = {"final_checkpoint": os.path.basename(self.latest.latest_checkpoint),
                "step": final_step, "epoch": int(self.variables.epoch.numpy()),
                "best_rsum": float(self.variables.best_rsum.numpy()),
                "best_checkpoint": os.path.relpath(best, self.directory) if best else None}
        if train_accuracy:
            done["train_accuracy"] = train_accuracy
        if write:
            run_layout.write_json_atomically(os.path.join(self.directory, run_layout.DONE_MARKER), done)
        return done


def load_stage1_final(model: DualPath, stage1_dir: str) -> None:
    """Loads the final weights of the finished stage I in stage1_dir (where stage II starts).

    Raises:
      FileNotFoundError: stage I has not finished there (names its missing done marker).
    """
    done = run_layout.read_done_marker(stage1_dir, 1)
    if done is None:
        marker = os.path.join(run_layout.stage_dir(stage1_dir, 1), run_layout.DONE_MARKER)
        raise FileNotFoundError(
            f"stage II starts from stage I's final checkpoint, but {marker} does not exist: "
            "train stage I first (--stage=1 or --stage=both)")
    path = run_layout.checkpoint_path(stage1_dir, 1, done, "last")
    run_layout.load_checkpoint(model, path)
    logging.info("stage 2: starts from stage I's final checkpoint %s", path)
