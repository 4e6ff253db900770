"""dual_path.run_layout: a run's files in its model_dir written and read back. The config tree
round-trips through config.json and every way it cannot be read names the file; done markers
decide which stage is the last finished and which of its checkpoints is restored; restore
rebuilds the model from config.json and loads that checkpoint."""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from dual_path import run_layout
from dual_path.config import TrainConfig
from dual_path.model import build_dual_path

from conftest import tiny_model, tiny_stage

SIZES = {"vocab_size": 30, "num_classes": 6, "max_length": 8}


def run_config(model_dir, **overrides) -> TrainConfig:
    """A two-stage run of the tiny model with fields of the run and of both stages away from
    their defaults, so that one lost on the way would show; stages as the tuple config.json
    reads back."""
    options = dict(model_dir=str(model_dir), shard_dir="/data/shards", model=tiny_model(**SIZES),
                   stages=(tiny_stage(1, epochs=3, lr_values=(0.2, 0.02), lr_boundaries=(2.0,)),
                           tiny_stage(2, weights="2:1:0.1", backbone_trainable_blocks=1,
                                      hardest_negative=False)),
                   batch_size=4, flip="off", eval_folds=5)
    return TrainConfig(**{**options, **overrides})


def write_done(model_dir, stage: int, **marker) -> None:
    """Writes `marker` as the stage's done marker, as the trainer does when a stage ends."""
    os.makedirs(run_layout.stage_dir(str(model_dir), stage), exist_ok=True)
    run_layout.write_json_atomically(
        os.path.join(run_layout.stage_dir(str(model_dir), stage), run_layout.DONE_MARKER), marker)


def test_the_config_tree_round_trips_through_config_json(tmp_path):
    """What evaluation, export and the benchmarks rebuild a run from is the config the run
    saved, field for field (tuples, the stages' LossWeights and None included)."""
    config = run_config(tmp_path / "run")
    run_layout.save_run_config(config)
    assert run_layout.load_run_config(str(tmp_path / "run")) == config
    assert run_layout.load_model_config(str(tmp_path / "run")) == config.model
    written = json.loads((tmp_path / "run" / run_layout.RUN_CONFIG_NAME).read_text())
    assert written["stages"][1]["loss_weights"] == {"rank": 2.0, "image": 1.0, "text": 0.1}
    assert written["model"]["weights"] is None and written["model"]["head_dims"] == [16, 16]


def test_a_config_json_with_one_optimizer_for_the_run_gives_it_to_each_stage(tmp_path):
    """A run saved before each stage chose its optimizer wrote `optimizer` beside the stages."""
    config = run_config(tmp_path / "run")
    run_layout.save_run_config(config)
    path = tmp_path / "run" / run_layout.RUN_CONFIG_NAME
    values = json.loads(path.read_text())
    for stage in values["stages"]:
        del stage["optimizer"]
    path.write_text(json.dumps({**values, "optimizer": "adam"}))
    loaded = run_layout.load_run_config(str(tmp_path / "run"))
    assert [stage.optimizer for stage in loaded.stages] == ["adam", "adam"]
    assert loaded == dataclasses.replace(config, stages=tuple(
        dataclasses.replace(stage, optimizer="adam") for stage in config.stages))


def test_a_folder_without_config_json_is_not_a_model_dir(tmp_path):
    path = tmp_path / run_layout.RUN_CONFIG_NAME
    with pytest.raises(FileNotFoundError) as error:
        run_layout.load_run_config(str(tmp_path))
    assert str(error.value) == f"{path} does not exist: {tmp_path} is not a dual-path model_dir"


@pytest.mark.parametrize("edit, reason", [
    (lambda values: json.dumps(values)[:-1], "Expecting ',' delimiter"),  # cut short
    (lambda values: json.dumps({**values, "batch": 4}), "not fields of TrainConfig: batch"),
    (lambda values: json.dumps({**values, "batch_size": 0}), "batch_size must be positive, got 0"),
    (lambda values: json.dumps({**values, "model": {**values["model"], "head_dims": []}}),
     "head_dims must name at least one fc layer"),
])
def test_a_config_json_that_cannot_be_read_is_named_with_the_reason(tmp_path, edit, reason):
    """edit: the saved config's values -> the text written over config.json."""
    run_layout.save_run_config(run_config(tmp_path))
    path = tmp_path / run_layout.RUN_CONFIG_NAME
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(ValueError) as error:
        run_layout.load_run_config(str(tmp_path))
    assert str(error.value).startswith(f"{path}: cannot read the run's config: ")
    assert reason in str(error.value)


def test_write_run_flags_writes_the_flagfile_into_a_new_model_dir(tmp_path):
    run_layout.write_run_flags(str(tmp_path / "new" / "run"), "--batch_size=4\n--flip=off\n")
    assert (tmp_path / "new" / "run" / "flags.txt").read_text() == "--batch_size=4\n--flip=off\n"


def test_the_last_stage_with_a_done_marker_is_the_finished_one(tmp_path):
    """A stage without its marker (killed, or not run) never counts; stage II alone (a run
    started from another run's stage I) does."""
    with pytest.raises(FileNotFoundError) as error:
        run_layout.latest_finished_stage(str(tmp_path))
    assert str(error.value) == f"{tmp_path}: no finished training stage (no stage*/done)"
    os.makedirs(run_layout.stage_dir(str(tmp_path), 2))  # stage II started, not finished
    write_done(tmp_path, 1, final_checkpoint="ckpt-5", step=5)
    assert run_layout.read_done_marker(str(tmp_path), 2) is None
    assert run_layout.latest_finished_stage(str(tmp_path)) == (1, {"final_checkpoint": "ckpt-5",
                                                                   "step": 5})
    write_done(tmp_path, 2, final_checkpoint="ckpt-10", step=10)
    assert run_layout.latest_finished_stage(str(tmp_path))[0] == 2
    os.remove(os.path.join(run_layout.stage_dir(str(tmp_path), 1), run_layout.DONE_MARKER))
    assert run_layout.latest_finished_stage(str(tmp_path))[0] == 2


@pytest.mark.parametrize("best_checkpoint, which, expected", [
    ("best/ckpt-3", "best", "stage2/best/ckpt-3"),
    ("best/ckpt-3", "last", "stage2/ckpt-5"),
    (None, "best", "stage2/ckpt-5"),  # a stage without validation has no best
])
def test_checkpoint_path_takes_the_best_one_when_there_is_one(best_checkpoint, which, expected):
    done = {"final_checkpoint": "ckpt-5", "best_checkpoint": best_checkpoint}
    assert run_layout.checkpoint_path("run", 2, done, which) == os.path.join("run", expected)


def test_checkpoint_path_refuses_another_choice():
    with pytest.raises(ValueError, match=r"^checkpoint must be one of \('best', 'last'\), got 'first'$"):
        run_layout.checkpoint_path("run", 1, {"final_checkpoint": "ckpt-5"}, "first")


def test_restore_rebuilds_the_model_and_loads_the_chosen_checkpoint(tmp_path):
    """Two checkpoints of stage II with different weights: restore loads the best one or the
    last one as asked, into a model rebuilt from config.json without its pretrained weights
    (the config names a weights file that does not exist: reading it would fail)."""
    model_dir = tmp_path / "run"
    config = run_config(model_dir, model=tiny_model(**SIZES, weights=str(tmp_path / "absent.h5")))
    run_layout.save_run_config(config)
    stage_dir = run_layout.stage_dir(str(model_dir), 2)
    saved = {}
    for name in ("best/ckpt-3", "ckpt-5"):
        model = build_dual_path(tiny_model(**SIZES))  # its own random weights
        tf.train.Checkpoint(model=model.training_model).write(os.path.join(stage_dir, name))
        saved[name] = [weight.numpy() for weight in model.training_model.weights]
    assert any(not np.array_equal(best, last) for best, last in zip(*saved.values()))
    write_done(model_dir, 2, final_checkpoint="ckpt-5", best_checkpoint="best/ckpt-3")

    for which, name in (("best", "best/ckpt-3"), ("last", "ckpt-5")):
        restored, path = run_layout.restore(str(model_dir), which)
        assert path == os.path.join(stage_dir, name)
        assert restored.config == dataclasses.replace(config.model, weights=None)
        for expected, weight in zip(saved[name], restored.training_model.weights):
            np.testing.assert_array_equal(weight.numpy(), expected, err_msg=weight.path)


def test_a_run_of_an_earlier_version_is_told_how_to_write_its_config(tmp_path):
    """Runs trained before config.json have model_config.json and flags.txt: rerunning the
    training command writes config.json without training finished stages again."""
    (tmp_path / "model_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"trained by an earlier dual-path .*"
                       r"dual-path-train --flagfile=.*flags.txt"):
        run_layout.load_run_config(str(tmp_path))
