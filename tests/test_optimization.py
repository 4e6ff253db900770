"""MatConvNetSGD against a NumPy transcription of MatConvNet's update, and the lr schedule."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from dual_path import optimization


def _matconvnet_reference(weights, gradients, learning_rates, multiplier, momentum, weight_decay):
    """cnn_train_dag's Nesterov update, step by step, in NumPy (float64)."""
    weights = np.array(weights, np.float64)
    velocity = np.zeros_like(weights)
    for gradient, learning_rate in zip(gradients, learning_rates):
        direction = multiplier * (gradient + weight_decay * weights)
        velocity = momentum * velocity - direction
        weights = weights + learning_rate * (momentum * velocity - direction)
    return weights


def test_update_matches_matconvnet_with_multipliers_decay_and_schedule_change():
    rng = np.random.default_rng(0)
    initial = {"plain": rng.normal(size=(3, 2)), "embedding": rng.normal(size=(5,))}
    variables = {name: keras.Variable(value.astype(np.float32), name=name)
                 for name, value in initial.items()}
    step = tf.Variable(0, dtype=tf.int64)
    schedule = optimization.PiecewiseConstantSchedule([2], [0.1, 0.01])
    optimizer = optimization.MatConvNetSGD(
        lambda: schedule(step), momentum=0.9, weight_decay=1e-2,
        lr_multipliers={variables["embedding"].path: 1e-3})
    gradients = {name: [rng.normal(size=value.shape) for _ in range(4)]
                 for name, value in initial.items()}
    for index in range(4):
        optimizer.apply([tf.constant(gradients[name][index], tf.float32) for name in variables],
                        list(variables.values()))
        step.assign_add(1)
    learning_rates = [0.1, 0.1, 0.01, 0.01]
    for name, multiplier in (("plain", 1.0), ("embedding", 1e-3)):
        expected = _matconvnet_reference(initial[name], gradients[name], learning_rates,
                                         multiplier, 0.9, 1e-2)
        np.testing.assert_allclose(variables[name].numpy(), expected, rtol=1e-5, atol=1e-7)
    # The multiplier really slowed the embedding down: it moved ~1000x less than plain would.
    assert np.abs(variables["embedding"].numpy() - initial["embedding"]).max() < 1e-3


def test_weight_decay_alone_shrinks_weights_by_the_l2_rule():
    variable = keras.Variable(np.full((4,), 2.0, np.float32))
    optimizer = optimization.MatConvNetSGD(0.5, momentum=0.0, weight_decay=0.1, nesterov=False)
    optimizer.apply([tf.zeros((4,))], [variable])
    np.testing.assert_allclose(variable.numpy(), 2.0 - 0.5 * 0.1 * 2.0, rtol=1e-6)


def test_multiplier_for_a_variable_not_trained_is_an_error():
    variable = keras.Variable(np.zeros((2,), np.float32), name="w")
    optimizer = optimization.MatConvNetSGD(0.1, lr_multipliers={"not/there": 0.5})
    with pytest.raises(ValueError, match="not/there"):
        optimizer.build([variable])


def test_schedule_values_and_boundaries_in_epochs():
    schedule = optimization.schedule_from_flags([40, 60], [0.1, 0.01, 0.001], "epochs",
                                                steps_per_epoch=10)
    assert schedule.boundaries == [400, 600]
    for step, expected in ((0, 0.1), (399, 0.1), (400, 0.01), (599, 0.01), (600, 0.001)):
        assert schedule.value_at(step) == expected
        assert float(schedule(tf.constant(step))) == pytest.approx(expected)
    assert optimization.schedule_from_flags([], [0.1], "steps", 10).value_at(10**6) == 0.1
    with pytest.raises(ValueError, match="one value more"):
        optimization.PiecewiseConstantSchedule([1, 2], [0.1])
    with pytest.raises(ValueError, match="unit"):
        optimization.schedule_from_flags([1], [0.1, 0.2], "minutes", 10)
