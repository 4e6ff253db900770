"""The two-stage trainer on tiny shards written here by the real data_prep code, on CPU.

Covers: stage I freezes the backbone (weights and BN statistics) and stage II trains it;
a non-finite loss stops the run with the last good checkpoint kept; mixed precision;
MirroredStrategy on two logical CPUs (its own process); resume after SIGKILL of
experiments/train.py mid-stage, with finished stages not trained again and the final weights
of an uninterrupted run; steps_per_loop.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from dual_path import checkpointing, embeddings, evaluation, input_pipeline, losses, run_layout, training
from dual_path.config import TrainConfig

from conftest import tiny_model, tiny_model_flags
from conftest import tiny_stage as stage  # test_instance_loss.py imports stage and tiny_config

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
BATCH = 8
NUM_TRAIN = 40  # 5 steps per epoch
STEPS_PER_EPOCH = NUM_TRAIN // BATCH

# tiny_config's run as flags of experiments/train.py, but a log line every step.
TINY_FLAGS = [*tiny_model_flags(), f"--batch_size={BATCH}", "--log_every_steps=1",
              "--noeval_flip_images"]


@pytest.fixture(scope="module")
def shard_dir(synthetic_shards) -> str:
    """Synthetic dataset (40 train, 12 val images of 32x32) -> shards, via the real data_prep."""
    return synthetic_shards("data", num_train=NUM_TRAIN, num_val=12, image_size=IMAGE_SIZE, seed=0).shard_dir


def tiny_config(shard_dir, model_dir, stages, **overrides) -> TrainConfig:
    """The tiny model on the shards in shard_dir, batches of 8, a log line every 5 steps,
    evaluation without the image flip (the captions say left and right), 4 projector images;
    overrides replace any TrainConfig field."""
    model = tiny_model(json.loads(Path(shard_dir, "manifest.json").read_text()))
    options = dict(model_dir=str(model_dir), shard_dir=shard_dir, model=model, stages=stages,
                   batch_size=BATCH, log_every_steps=5, eval_flip_images=False,
                   projector_images=4)
    options.update(overrides)
    return TrainConfig(**options)


def snapshot(variables) -> dict:
    return {variable.path: np.array(variable.numpy()) for variable in variables}


def changed(before: dict, after: dict) -> set:
    return {path for path in before if not np.array_equal(before[path], after[path])}


def test_stage1_keeps_the_backbone_and_its_bn_statistics_stage2_trains_them(shard_dir, tmp_path):
    trainer = training.Trainer(tiny_config(shard_dir, tmp_path / "run", [stage(1), stage(2)]))
    backbone = trainer.model.backbone
    moving = [v for v in backbone.weights if "moving_" in v.path]
    kernels = [v for v in backbone.weights if v.path.endswith("kernel")]
    assert moving and kernels
    text_weights = trainer.model.text_cnn.trainable_variables
    before = snapshot(backbone.weights)
    text_before = snapshot(text_weights)

    trainer.run_stage(trainer.config.stages[0])
    assert changed(before, snapshot(backbone.weights)) == set()
    assert changed(text_before, snapshot(text_weights))  # stage I did train the text path

    trainer.run_stage(trainer.config.stages[1])
    after = snapshot(backbone.weights)
    assert {v.path for v in moving} <= changed(before, after)
    assert {v.path for v in kernels} <= changed(before, after)

    for number in (1, 2):
        done = run_layout.read_done_marker(str(tmp_path / "run"), number)
        assert done["step"] == STEPS_PER_EPOCH and done["epoch"] == 1
        assert done["best_checkpoint"].startswith("best/")
    logs = tmp_path / "run" / "logs" / "stage2"
    assert list((logs / "train").iterdir()) and list((logs / "validation").iterdir())
    assert (logs / "validation" / "projector_config.pbtxt").exists()


def test_training_view_bn_statistics_are_set_once_before_stage1_and_start_stage2(shard_dir,
                                                                                 tmp_path):
    """--backbone_bn_statistics=training_views: a fresh stage I first sets the backbone's
    moving statistics from the training views and trains with them, its weights untouched;
    stage II starts from them (stage I's checkpoint), and a run resumed after stage I does not set them
    again."""
    config = tiny_config(shard_dir, tmp_path / "run", [stage(1, feature_views=2), stage(2)],
                         backbone_bn_statistics="training_views")
    trainer = training.Trainer(config)
    backbone = trainer.model.backbone
    before = snapshot(backbone.weights)
    trainer.run_stage(config.stages[0])
    after_stage1 = snapshot(backbone.weights)
    assert changed(before, after_stage1) == {path for path in before if "moving_" in path}

    resumed = training.Trainer(config)
    calls = []
    resumed.reestimate_backbone_batch_norm = lambda *args: calls.append(args)
    resumed.run_stage(config.stages[0])
    state = resumed._start_stage(config.stages[1])
    assert not calls and state.step == 0
    assert changed(after_stage1, snapshot(resumed.model.backbone.weights)) == set()
    with pytest.raises(ValueError, match="backbone_bn_statistics must be one of "
                                         r"\('pretrained', 'training_views', "
                                         r"'training_views_stage2_top'\), got 'imagenet'"):
        tiny_config(shard_dir, tmp_path / "other", [stage(1)], backbone_bn_statistics="imagenet")


def test_stage2_top_bn_statistics_are_only_those_stage2_trains_with_batch_statistics(shard_dir,
                                                                                    tmp_path):
    """training_views_stage2_top with stage II on small_cnn's last block: stage I sets block 2's
    BN statistics only; a run without such a stage II is refused before training."""
    top = stage(2, backbone_trainable_blocks=1)
    config = tiny_config(shard_dir, tmp_path / "run", [stage(1), top],
                         backbone_bn_statistics="training_views_stage2_top")
    trainer = training.Trainer(config)
    before = snapshot(trainer.model.backbone.weights)
    trainer.run_stage(config.stages[0])
    assert changed(before, snapshot(trainer.model.backbone.weights)) == {
        "small_cnn_bn2/moving_mean", "small_cnn_bn2/moving_variance"}
    for stages in ([stage(1)], [stage(1), stage(2, backbone_bn_frozen=True)]):
        with pytest.raises(ValueError, match="training_views_stage2_top sets the statistics of the "
                                             "top stage II trains with batch statistics"):
            tiny_config(shard_dir, tmp_path / "other", stages,
                        backbone_bn_statistics="training_views_stage2_top")


def test_precise_bn_leaves_stage2s_checkpoint_with_the_mean_batch_statistics_of_its_weights(
        shard_dir, tmp_path):
    """--stage2_precise_bn: the final checkpoint's trained BN holds the mean batch statistics of
    the final weights (re-estimating again changes nothing); Keras' moving average, without it,
    does not. The layers below the trained top keep theirs."""
    def run(name, precise_bn):
        top = stage(2, backbone_trainable_blocks=1, precise_bn=precise_bn)
        trainer = training.Trainer(tiny_config(shard_dir, tmp_path / name, [stage(1), top]))
        trainer.train()
        restored, _ = run_layout.restore(str(tmp_path / name), which="last")
        final = snapshot(restored.backbone.weights)
        assert changed(final, snapshot(trainer.model.backbone.weights)) == set()
        trainer.reestimate_backbone_batch_norm(top, trainer._trained_top(top))
        again = snapshot(trainer.model.backbone.weights)
        return {path: np.abs(final[path] - again[path]).max() for path in final}

    precise, moving_average = run("precise", True), run("moving_average", False)
    for name in ("small_cnn_bn2/moving_mean", "small_cnn_bn2/moving_variance"):
        assert precise[name] < 1e-4 < moving_average[name]
    assert {path for path, difference in precise.items() if difference} <= {
        "small_cnn_bn2/moving_mean", "small_cnn_bn2/moving_variance"}
    with pytest.raises(ValueError, match="stage 2: precise_bn re-estimates the statistics of the "
                                         "BatchNorm layers the stage trains, but it trains none"):
        tiny_config(shard_dir, tmp_path / "other", [stage(2, precise_bn=True, backbone_bn_frozen=True)])


def test_stage2_on_its_own_batch_size_counts_its_epochs_and_precise_bn_in_its_batches(
        shard_dir, tmp_path, monkeypatch):
    """--stage2_batch_size: stage II trains and re-estimates its BN statistics (precise BN) on
    batches of its own size, its epochs in its own steps (40 images: 5 steps of 8 in stage I,
    2 of 20 in stage II); stage I keeps --batch_size."""
    batch_sizes = []
    for name in ("train_dataset", "cached_feature_dataset", "batch_norm_view_batches"):
        original = getattr(input_pipeline, name)

        def recording(*args, _name=name, _original=original, **kwargs):
            batch_sizes.append((_name, kwargs["batch_size"]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(input_pipeline, name, recording)
    top = stage(2, epochs=2, batch_size=20, backbone_trainable_blocks=1, precise_bn=True)
    config = tiny_config(shard_dir, tmp_path / "run", [stage(1, feature_views=2), top],
                         validate_every_epochs=1)
    trainer = training.Trainer(config)
    assert trainer.steps_per_epoch == {1: STEPS_PER_EPOCH, 2: NUM_TRAIN // 20}
    results = trainer.train()
    assert batch_sizes == [("cached_feature_dataset", BATCH), ("train_dataset", 20),
                           ("batch_norm_view_batches", 20), ("batch_norm_view_batches", 20)]
    assert run_layout.read_done_marker(str(tmp_path / "run"), 1)["step"] == STEPS_PER_EPOCH
    assert run_layout.read_done_marker(str(tmp_path / "run"), 2)["step"] == 2 * (NUM_TRAIN // 20)
    assert [(point["stage"], point["step"], point["epoch"]) for point in results["validation_curve"]] == [
        (1, STEPS_PER_EPOCH, 1.0), (2, 2, 1.0), (2, 4, 2.0)]
    with pytest.raises(ValueError, match="fewer training images than one batch of 64 \\(stage 2\\)"):
        training.Trainer(tiny_config(shard_dir, tmp_path / "big", [stage(1), stage(2, batch_size=64)]))
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        tiny_config(shard_dir, tmp_path / "zero", [stage(2, batch_size=0)])


def test_weight_average_is_validated_mid_stage_and_becomes_stage2s_final_weights(shard_dir,
                                                                                tmp_path):
    """--stage2_weight_average_momentum 0.5 over two epochs validated after each, with precise
    BN: each validation scores the average of the weights after every step so far, training
    goes on from the trained weights (its steps are those of a run without the average), and
    the final checkpoint holds the last average with the BN statistics of those weights."""
    def run(name, momentum):
        top = stage(2, epochs=2, backbone_trainable_blocks=1, precise_bn=True,
                    weight_average_momentum=momentum)
        keras.utils.set_random_seed(0)  # the two runs start from the same weights
        trainer = training.Trainer(tiny_config(shard_dir, tmp_path / name, [stage(1), top],
                                               validate_every_epochs=1, steps_per_loop=1,
                                               log_every_steps=1))
        trainer.run_stage(trainer.config.stages[0])
        trained = trainer.model.training_model.trainable_variables
        steps, validated = [], []
        log_progress, validate = trainer._log_progress, trainer._validate
        trainer._log_progress = lambda *args: (steps.append(snapshot(trained)), log_progress(*args))
        trainer._validate = lambda *args: (validated.append(snapshot(trained)), validate(*args))[1]
        trainer.run_stage(top)
        return trainer, steps, validated

    trainer, steps, validated = run("averaged", 0.5)
    _, plain_steps, _ = run("plain", None)
    assert len(steps) == len(plain_steps) == 2 * STEPS_PER_EPOCH and len(validated) == 2
    for averaged_step, plain_step in zip(steps, plain_steps):
        assert all(np.allclose(averaged_step[path], plain_step[path], atol=1e-5)
                   for path in plain_step)
    averages = []
    for weights in steps:
        averages.append(weights if not averages else {
            path: 0.5 * averages[-1][path] + 0.5 * value for path, value in weights.items()})
    for scored, average in zip(validated, (averages[STEPS_PER_EPOCH - 1], averages[-1])):
        assert all(np.allclose(scored[path], average[path], atol=1e-5) for path in average)
    assert changed(averages[-1], steps[-1])

    restored, _ = run_layout.restore(str(tmp_path / "averaged"), which="last")
    final = snapshot(restored.backbone.weights)
    assert all(np.allclose(final[path], averages[-1][path], atol=1e-5)
               for path in averages[-1] if path in final)
    stage2 = trainer.config.stages[1]
    trainer.reestimate_backbone_batch_norm(stage2, trainer._trained_top(stage2))
    again = snapshot(trainer.model.backbone.weights)
    assert all(np.abs(final[path] - again[path]).max() < 1e-4 for path in final)
    with pytest.raises(ValueError, match="stage 2: weight_average_momentum must be in"):
        tiny_config(shard_dir, tmp_path / "other", [stage(2, weight_average_momentum=1.0)])


def test_stage2_trains_only_the_backbones_top_blocks_at_their_multipliers(shard_dir, tmp_path):
    """Only small_cnn's block 2 trains in stage II: block 1 keeps its weights and its BN moving
    statistics; the BN scales and the first conv's kernel get their own lr multipliers."""
    partial = stage(2, backbone_lr_multiplier=0.02, backbone_bn_lr_multiplier=0.001,
                    first_conv_lr_multiplier=1e-4, backbone_trainable_blocks=1)
    trainer = training.Trainer(tiny_config(shard_dir, tmp_path / "run", [stage(1), partial]))
    trainer.run_stage(trainer.config.stages[0])
    backbone = trainer.model.backbone
    before = snapshot(backbone.weights)
    trainer.run_stage(partial)
    moved = changed(before, snapshot(backbone.weights))
    block1 = {path for path in before if "small_cnn_conv1" in path or "small_cnn_bn1" in path}
    block2 = {path for path in before if "small_cnn_conv2" in path or "small_cnn_bn2" in path}
    assert len(block1) == len(block2) == 5  # kernel; gamma, beta, moving mean and variance
    assert moved == block2
    multipliers = trainer._lr_multipliers(partial)
    assert {path: multipliers[path] for path in block2 if "moving" not in path} == {
        "small_cnn_conv2/kernel": 0.02, "small_cnn_bn2/gamma": 0.001, "small_cnn_bn2/beta": 0.001}
    assert not block1 & set(multipliers)


def test_stage2_with_frozen_bn_trains_the_top_blocks_convs_only(shard_dir, tmp_path):
    """--stage2_backbone_bn_frozen: block 2's conv trains, its BN keeps scale, offset and
    moving statistics, so stage II's crops reach the heads as stage I's cached features did."""
    partial = stage(2, backbone_lr_multiplier=0.02, backbone_trainable_blocks=1,
                    backbone_bn_frozen=True)
    trainer = training.Trainer(tiny_config(shard_dir, tmp_path / "run", [stage(1), partial]))
    trainer.run_stage(trainer.config.stages[0])
    before = snapshot(trainer.model.backbone.weights)
    trainer.run_stage(partial)
    assert changed(before, snapshot(trainer.model.backbone.weights)) == {"small_cnn_conv2/kernel"}
    assert trainer._lr_multipliers(partial)["small_cnn_conv2/kernel"] == 0.02


def test_frozen_bn_with_a_bn_lr_multiplier_is_refused(shard_dir, tmp_path):
    both = stage(2, backbone_bn_frozen=True, backbone_bn_lr_multiplier=0.001)
    with pytest.raises(ValueError, match="stage 2: the backbone's BatchNorm layers are frozen"):
        tiny_config(shard_dir, tmp_path / "run", [both])


def test_stage2_multipliers_of_the_whole_backbone(shard_dir, tmp_path):
    """The first conv's kernel at its own multiplier, BN at the backbone's when not given."""
    whole = stage(2, backbone_lr_multiplier=0.02, first_conv_lr_multiplier=1e-4)
    trainer = training.Trainer(tiny_config(shard_dir, tmp_path / "run", [whole]))
    trainer.model.backbone.trainable = True
    multipliers = trainer._lr_multipliers(whole)
    assert multipliers["small_cnn_conv1/kernel"] == 1e-4
    assert multipliers["small_cnn_conv2/kernel"] == multipliers["small_cnn_bn1/gamma"] == 0.02


def test_stage2_with_no_block_to_train_keeps_the_whole_backbone(shard_dir, tmp_path):
    """--stage2_backbone_trainable_blocks=0: stage II trains the heads and the text path on
    fresh crops, the backbone frozen with its BN statistics (the no-fine-tuning ablation)."""
    frozen = stage(2, backbone_trainable_blocks=0)
    trainer = training.Trainer(tiny_config(shard_dir, tmp_path / "run", [stage(1), frozen]))
    trainer.run_stage(trainer.config.stages[0])
    before = snapshot(trainer.model.backbone.weights)
    head_before = snapshot(trainer.model.text_cnn.trainable_variables)
    trainer.run_stage(frozen)
    assert changed(before, snapshot(trainer.model.backbone.weights)) == set()
    assert changed(head_before, snapshot(trainer.model.text_cnn.trainable_variables))
    assert not trainer.model.backbone.trainable_variables


@pytest.mark.parametrize("top, message", [
    (dict(backbone_trainable_from="block_13_expand"), "has no layer 'block_13_expand'; its layers: "
                                                      "small_cnn_rescale, small_cnn_conv1"),
    (dict(backbone_trainable_blocks=3), r"has 2 blocks \(1, 2\), asked to train the last 3"),
    (dict(backbone_trainable_blocks=1, backbone_trainable_from="small_cnn_bn2"), "not both"),
])
def test_a_top_of_the_backbone_it_lacks_fails_before_training(shard_dir, tmp_path, top, message):
    wrong = stage(2, **top)
    with pytest.raises(ValueError, match=message):
        training.Trainer(tiny_config(shard_dir, tmp_path / "run", [stage(1), wrong]))
    assert not (tmp_path / "run" / "stage1").exists()


def test_a_frozen_stage_with_a_top_to_train_is_refused(shard_dir, tmp_path):
    frozen = stage(1, backbone_trainable_blocks=1)
    with pytest.raises(ValueError, match="stage 1: the top of the backbone to train .* freezes"):
        tiny_config(shard_dir, tmp_path / "run", [frozen])


def test_non_finite_loss_stops_with_the_last_good_checkpoint_kept(shard_dir, tmp_path):
    # Two sane steps (checkpointed), then an absurd learning rate.
    absurd = stage(1, lr_values=(0.01, 1e38), lr_boundaries=(2,))
    config = tiny_config(shard_dir, tmp_path / "run", [absurd], lr_boundary_unit="steps",
                         checkpoint_every_steps=1)
    with pytest.raises(training.NonFiniteLossError, match=r"not finite.*last good checkpoint is "
                                                          r".*stage1/ckpt-2$"):
        training.train(config)
    stage_dir = tmp_path / "run" / "stage1"
    assert tf.train.latest_checkpoint(str(stage_dir)).endswith("ckpt-2")
    assert not (stage_dir / run_layout.DONE_MARKER).exists()
    for name, _ in tf.train.list_variables(str(stage_dir / "ckpt-2")):
        value = tf.train.load_variable(str(stage_dir / "ckpt-2"), name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), name


def _logged(model_dir: Path, tag: str) -> dict:
    """{step: value} of a stage I train summary."""
    values = {}
    for path in sorted((model_dir / "logs" / "stage1" / "train").iterdir()):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def test_steps_per_loop_trains_the_same_steps_in_fewer_host_calls(shard_dir, tmp_path, monkeypatch):
    calls = []
    make_train_loop = training.Trainer.make_train_loop

    def counting(self, *args):
        train_loop, log_means, interval_means = make_train_loop(self, *args)

        def counted(iterator, num_steps):
            calls.append(int(num_steps))
            return train_loop(iterator, num_steps)
        return counted, log_means, interval_means

    monkeypatch.setattr(training.Trainer, "make_train_loop", counting)
    runs = {}
    for steps_per_loop in (1, 5):
        calls.clear()
        model_dir = tmp_path / f"loop{steps_per_loop}"
        keras.utils.set_random_seed(0)
        trainer = training.Trainer(tiny_config(shard_dir, model_dir, [stage(1, epochs=2)],
                                               steps_per_loop=steps_per_loop, log_every_steps=5))
        trainer.run_stage(trainer.config.stages[0])
        runs[steps_per_loop] = (list(calls), snapshot(trainer.model.training_model.weights),
                                _logged(model_dir, "loss/loss"), _logged(model_dir, "accuracy/text_accuracy"))
    assert runs[1][0] == [1] * 10 and runs[5][0] == [5, 5]
    assert runs[1][2].keys() == runs[5][2].keys() == {5, 10}
    for index in (2, 3):
        for step_number in (5, 10):
            np.testing.assert_allclose(runs[5][index][step_number], runs[1][index][step_number], rtol=1e-5)
    for path, value in runs[1][1].items():
        np.testing.assert_allclose(runs[5][1][path], value, rtol=1e-5, atol=1e-6, err_msg=path)


def test_a_non_finite_loss_inside_a_loop_stops_at_its_step(shard_dir, tmp_path):
    absurd = stage(1, lr_values=(0.01, 1e38), lr_boundaries=(2,))
    config = tiny_config(shard_dir, tmp_path / "run", [absurd], lr_boundary_unit="steps",
                         steps_per_loop=5, log_every_steps=5)
    # lr 1e38 from step 3 on: step 3's update overflows, step 4's loss is NaN; the loop of 5
    # stops there, not at its end.
    with pytest.raises(training.NonFiniteLossError,
                       match=r"^stage 1 step 4: loss = nan, .*\(lr 1e\+38\)\. Stopped without saving; "
                             r"the last good checkpoint is none \(no checkpoint yet\)$"):
        training.train(config)
    assert not (tmp_path / "run" / "stage1" / run_layout.DONE_MARKER).exists()


def test_mixed_precision_trains_both_stages_with_finite_results(shard_dir, tmp_path):
    config = tiny_config(shard_dir, tmp_path / "run", [stage(1), stage(2)], mixed_precision=True)
    results = training.train(config)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored afterwards
    assert all(np.isfinite(value) for value in results["metrics"]["val"].values())
    names = [name for name, _ in tf.train.list_variables(str(tmp_path / "run" / "stage2" / "ckpt-5"))]
    assert any("dynamic_scale" in name for name in names)  # the loss-scale optimizer's state


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, {tests!r})
    from test_training import stage, tiny_config
    from absl import logging
    from dual_path import training
    logging.set_verbosity(logging.INFO)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    config = tiny_config({shard_dir!r}, {model_dir!r}, [stage(1), stage(2)])
    results = training.train(config, strategy)
    print("RESULT", json.dumps({{"replicas": strategy.num_replicas_in_sync,
                                 "rsum": results["metrics"]["val"]["rsum"]}}))
""")


@pytest.mark.subprocess
def test_mirrored_strategy_on_two_logical_cpus_trains(shard_dir, tmp_path):
    script = MIRRORED_SCRIPT.format(tests=str(REPO / "tests"), shard_dir=shard_dir,
                                    model_dir=str(tmp_path / "run"))
    process = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.split("RESULT", 1)[1])
    assert result["replicas"] == 2 and np.isfinite(result["rsum"])
    assert "stage 2 | epoch 1.00/1 | step 5/5" in process.stderr
    done = run_layout.read_done_marker(str(tmp_path / "run"), 2)
    assert done["step"] == STEPS_PER_EPOCH


@pytest.mark.subprocess
def test_resume_after_sigkill_continues_from_the_checkpoint(shard_dir, tmp_path):
    model_dir = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.train", f"--shard_dir={shard_dir}",
               f"--model_dir={model_dir}", "--stage=both", "--stage1_epochs=1",
               "--stage2_epochs=2", "--stage2_lr_values=0.1,0.01", "--stage2_lr_boundaries=1",
               "--stage2_loss_weights=1:1:1", "--checkpoint_every_steps=2", *TINY_FLAGS]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # First run: killed (SIGKILL) in stage II, after its step 7 (step 6 was checkpointed).
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=environment)
    first_log = []
    try:
        for line in first.stdout:
            first_log.append(line)
            if "stage 2 | epoch 1.40/2 | step 7/10" in line:
                first.send_signal(signal.SIGKILL)
                break
    finally:
        first.kill()
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "".join(first_log[-30:])
    assert (model_dir / "stage1" / run_layout.DONE_MARKER).exists()
    assert not (model_dir / "stage2" / run_layout.DONE_MARKER).exists()
    assert (model_dir / "flags.txt").exists() and (model_dir / run_layout.RUN_CONFIG_NAME).exists()

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment,
                            timeout=300)
    log = second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "stage 1 already finished" in log and "stage 1 |" not in log
    resumed = [line for line in log.splitlines() if "stage 2: resumed from" in line]
    assert len(resumed) == 1, log[-3000:]
    resumed_step = int(resumed[0].split(" at step ")[1].split()[0])
    assert 6 <= resumed_step < 10 and "(epoch 1)" in resumed[0] and "lr 0.01" in resumed[0]
    progress = [line for line in log.splitlines() if "stage 2 | epoch" in line]
    assert f"step {resumed_step + 1}/10" in progress[0] and "lr 0.01" in progress[0]

    final = str(model_dir / "stage2" / "ckpt-10")
    # Steps of both processes went through one optimizer: its state was restored.
    assert tf.train.load_variable(final, "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 10
    assert tf.train.load_variable(final, "epoch/.ATTRIBUTES/VARIABLE_VALUE") == 2
    assert run_layout.read_done_marker(str(model_dir), 2)["step"] == 10
    results = json.loads((model_dir / run_layout.RESULTS_NAME).read_text())
    assert results["stage"] == 2 and "val" in results["metrics"]
    assert "rsum" in second.stdout  # the results table

    # The resume went on with the batches the uninterrupted run trains: the same weights.
    uninterrupted_dir = tmp_path / "uninterrupted"
    uninterrupted = subprocess.run(
        [part.replace(str(model_dir), str(uninterrupted_dir)) for part in command], cwd=REPO,
        capture_output=True, text=True, env=environment, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    expected = str(uninterrupted_dir / "stage2" / "ckpt-10")
    for name, _ in tf.train.list_variables(expected):
        if name.startswith("model/"):
            np.testing.assert_allclose(tf.train.load_variable(final, name),
                                       tf.train.load_variable(expected, name), rtol=1e-5,
                                       atol=1e-6, err_msg=name)


def test_restored_model_reproduces_the_final_results(shard_dir, tmp_path):
    """run_layout.restore rebuilds the model from config.json and the chosen checkpoint:
    evaluated again, it gives exactly the metrics the trainer reported."""
    model_dir = str(tmp_path / "run")
    config = tiny_config(shard_dir, model_dir, [stage(1)])
    results = training.train(config)

    model, checkpoint = run_layout.restore(model_dir, which=config.results_checkpoint)
    assert checkpoint == results["checkpoint"]
    assert run_layout.load_model_config(model_dir) == config.model
    split = embeddings.SplitEmbedder(model.image_encoder, model.text_encoder,
                                     image_size=IMAGE_SIZE, max_length=config.model.max_length,
                                     flip_images=False)(shard_dir, "val")
    metrics = evaluation.retrieval_metrics(split.image @ split.text.T, split.image_of_text)
    assert metrics == pytest.approx(results["metrics"]["val"])


def test_same_seed_same_model(shard_dir, tmp_path):
    """config.seed fixes the initial weights too, not only the data order: two runs with
    the same seed end with identical weights."""
    finals = []
    for run in ("first", "second"):
        results = training.train(tiny_config(shard_dir, str(tmp_path / run), [stage(1)], seed=3))
        finals.append({name: tf.train.load_variable(results["checkpoint"], name)
                       for name, _ in tf.train.list_variables(results["checkpoint"])
                       if name.startswith("model/")})
    assert finals[0].keys() == finals[1].keys() and finals[0]
    for name, value in finals[0].items():
        np.testing.assert_array_equal(value, finals[1][name], err_msg=name)


def test_final_results_of_the_last_checkpoint_reuse_its_validation(shard_dir, tmp_path, monkeypatch):
    """With results_checkpoint="last" the stage's final validation already embedded the final
    weights: the results reuse it (one embedding pass of the split, not two) and equal a fresh
    evaluation of the restored model."""
    embedded = []
    original = embeddings.SplitEmbedder.__call__

    def counting(self, shard_dir, split):
        embedded.append(split)
        return original(self, shard_dir, split)

    monkeypatch.setattr(embeddings.SplitEmbedder, "__call__", counting)
    model_dir = str(tmp_path / "run")
    results = training.train(tiny_config(shard_dir, model_dir, [stage(1, epochs=2)],
                                         results_checkpoint="last", validate_every_epochs=2))
    assert embedded == ["val"]
    model, _ = run_layout.restore(model_dir, which="last")
    split = embeddings.SplitEmbedder(model.image_encoder, model.text_encoder, image_size=IMAGE_SIZE,
                                     max_length=model.config.max_length, flip_images=False)(shard_dir, "val")
    metrics = evaluation.retrieval_metrics(split.image @ split.text.T, split.image_of_text)
    assert metrics == pytest.approx(results["metrics"]["val"])


def test_stage2_from_another_runs_stage1_with_its_own_ranking_loss(shard_dir, tmp_path, monkeypatch):
    """--stage1_from starts stage II from another run's finished stage I, and a stage's own
    hardest_negative overrides the run's: the paper's hard negatives in stage II only."""
    first = str(tmp_path / "first")
    training.train(tiny_config(shard_dir, first, [stage(1)], hardest_negative=False))
    hardest_used = []
    original = losses.ranking_loss

    def recording(*args, hardest_negative, **kwargs):
        hardest_used.append(hardest_negative)
        return original(*args, hardest_negative=hardest_negative, **kwargs)

    monkeypatch.setattr(losses, "ranking_loss", recording)
    second = str(tmp_path / "second")
    stage2 = stage(2, hardest_negative=True)
    config = tiny_config(shard_dir, second, [stage2], hardest_negative=False, stage1_from=first)
    trainer = training.Trainer(config)
    checkpointing.load_stage1_final(trainer.model, first)
    first_model, _ = run_layout.restore(first, which="last")
    token_ids = np.arange(2 * config.model.max_length, dtype=np.int32).reshape(2, -1) % 7 + 2
    np.testing.assert_allclose(trainer.model.text_encoder(token_ids), first_model.text_encoder(token_ids),
                               rtol=1e-6)
    results = trainer.train()
    assert hardest_used and set(hardest_used) == {True}
    assert not os.path.exists(run_layout.stage_dir(second, 1))
    assert results["stage"] == 2 and np.isfinite(results["metrics"]["val"]["rsum"])
    with pytest.raises(ValueError, match="stage1_from"):
        tiny_config(shard_dir, second, [stage(1), stage2], stage1_from=first)


@pytest.mark.subprocess
def test_an_embedding_dim_other_than_the_shards_is_refused_before_training(shard_dir, tmp_path):
    flags = [flag for flag in TINY_FLAGS if not flag.startswith("--embedding_dim")]
    base = [sys.executable, "-m", "experiments.train", f"--shard_dir={shard_dir}", "--stage=1",
            "--stage1_epochs=1", *flags]
    refused = subprocess.run([*base, f"--model_dir={tmp_path / 'refused'}", "--embedding_dim=300"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert (f"--embedding_dim=300, but the shards in {shard_dir} hold 16-d word vectors"
            in refused.stderr), refused.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
    # Unset, it is the shards' width.
    taken = subprocess.run([*base, f"--model_dir={tmp_path / 'taken'}"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert run_layout.load_model_config(str(tmp_path / "taken")).embedding_dim == 16
