"""MatConvNetSGD against updates worked out by hand from MatConvNet's rule, and the lr schedule.

MatConvNet's cnn_train_dag.m (accumulateGradients, the default solver), for a parameter w
with batch-summed derivative G, thisLR = learningRate * the parameter's learningRate (lr_mult)
and thisDecay = weightDecay * the parameter's weightDecay (1 here):

    parDer = G / batchSize + thisDecay * w
    m      = momentum * m - parDer
    delta  = momentum * m - parDer         (nesterovUpdate; else delta = m)
    w      = w + thisLR * delta

Keras gives the batch mean, so G / batchSize is the gradient fed to the optimizer.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from dual_path import optimization


@pytest.mark.parametrize("nesterov, expected", [
    # w0 = [1, -2], lr_mult 0.5, momentum 0.9, weight decay 0.1; g1 = [0.2, 0.4] at lr 1,
    # then g2 = [-0.5, 0] at lr 0.1.
    # Step 1: parDer = g1 + 0.1 * w0 = [0.3, 0.2]; m1 = -parDer = [-0.3, -0.2];
    #   Nesterov: delta = 0.9 * m1 - parDer = [-0.57, -0.38]; w1 = w0 + 0.5 * delta = [0.715, -2.19].
    # Step 2: parDer = g2 + 0.1 * w1 = [-0.4285, -0.219];
    #   m2 = 0.9 * m1 - parDer = [0.1585, 0.039]; delta = 0.9 * m2 - parDer = [0.57115, 0.2541];
    #   w2 = w1 + 0.05 * delta = [0.7435575, -2.177295].
    # (Keras' rule, v = 0.9 v - lr * lr_mult * parDer with lr inside the velocity, gives
    # w2[0] = 0.6342075: the step-1 velocity would still move at lr 1.)
    (True, [0.7435575, -2.177295]),
    # Without Nesterov, delta = m. Step 1: w1 = w0 + 0.5 * [-0.3, -0.2] = [0.85, -2.1].
    # Step 2: parDer = [-0.5 + 0.085, -0.21] = [-0.415, -0.21]; m2 = [-0.27 + 0.415, -0.18 + 0.21]
    #   = [0.145, 0.03]; w2 = w1 + 0.05 * m2 = [0.85725, -2.0985].
    (False, [0.85725, -2.0985]),
])
def test_two_steps_with_an_lr_change_follow_matconvnets_rule(nesterov, expected):
    """Two updates of a 2-vector with an lr multiplier, weight decay and the lr set to a tenth
    between them (as the trainer sets `learning_rate` before each step) land on the weights
    worked out by hand from cnn_train_dag's rule: the velocity holds gradients, so the new lr
    scales the whole second step at once."""
    weights = keras.Variable(np.array([1.0, -2.0], np.float32), name="w")
    optimizer = optimization.MatConvNetSGD(1.0, momentum=0.9, weight_decay=0.1, nesterov=nesterov,
                                           lr_multipliers={weights.path: 0.5})
    optimizer.apply([tf.constant([0.2, 0.4])], [weights])
    optimizer.learning_rate.assign(0.1)
    optimizer.apply([tf.constant([-0.5, 0.0])], [weights])
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)


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


@pytest.mark.parametrize("name", optimization.OPTIMIZERS)
def test_weight_average_follows_its_rule_and_swaps_in_and_out_and_finalizes(name):
    """weight_average_momentum 0.5 over three steps: the average is the first step's weights,
    then 0.5 * average + 0.5 * weights; averaged_weights holds it only within its block, and
    finalize_variable_values makes it the weights, for each optimizer."""
    variable = keras.Variable(np.array([1.0, -2.0], np.float32), name="w")
    optimizer = optimization.build_optimizer(0.1, momentum=0.9, weight_decay=0.0, lr_multipliers={},
                                             loss_scaling=False, name=name,
                                             weight_average_momentum=0.5)
    optimizer.build([variable])
    average = None
    for gradient in ([1.0, 0.5], [-0.2, 2.0], [0.3, -1.0]):
        optimizer.apply([tf.constant(gradient)], [variable])
        weights = variable.numpy().copy()
        average = weights if average is None else 0.5 * average + 0.5 * weights
    assert not np.allclose(average, weights)
    with optimization.averaged_weights(optimizer, [variable]):
        np.testing.assert_allclose(variable.numpy(), average, rtol=1e-6)
    np.testing.assert_array_equal(variable.numpy(), weights)
    optimizer.finalize_variable_values([variable])
    np.testing.assert_allclose(variable.numpy(), average, rtol=1e-6)


def test_weight_average_is_saved_and_restored_with_the_optimizer(tmp_path):
    """A resumed stage goes on averaging from the saved average, not from its restored weights."""
    def averaging_optimizer():
        variable = keras.Variable(np.array([1.0, -2.0], np.float32), name="w")
        optimizer = optimization.build_optimizer(0.1, momentum=0.9, weight_decay=0.0,
                                                 lr_multipliers={}, loss_scaling=False,
                                                 weight_average_momentum=0.5)
        optimizer.build([variable])
        return variable, optimizer

    variable, optimizer = averaging_optimizer()
    for gradient in ([1.0, 0.5], [-0.2, 2.0]):
        optimizer.apply([tf.constant(gradient)], [variable])
    path = tf.train.Checkpoint(model_weights=[variable], optimizer=optimizer).save(str(tmp_path / "ckpt"))
    resumed, resumed_optimizer = averaging_optimizer()
    tf.train.Checkpoint(model_weights=[resumed], optimizer=resumed_optimizer).restore(
        path).assert_existing_objects_matched()
    with optimization.averaged_weights(optimizer, [variable]):
        average = variable.numpy().copy()
    assert not np.allclose(average, resumed.numpy())
    with optimization.averaged_weights(resumed_optimizer, [resumed]):
        np.testing.assert_array_equal(resumed.numpy(), average)


def test_without_a_weight_average_nothing_is_swapped_and_a_wrong_list_is_named():
    variable = keras.Variable(np.array([1.0, -2.0], np.float32), name="w")
    plain = optimization.build_optimizer(0.1, momentum=0.9, weight_decay=0.0, lr_multipliers={},
                                         loss_scaling=False)
    plain.apply([tf.constant([1.0, 1.0])], [variable])
    weights = variable.numpy().copy()
    with optimization.averaged_weights(plain, [variable]):
        np.testing.assert_array_equal(variable.numpy(), weights)
    averaging = optimization.build_optimizer(0.1, momentum=0.9, weight_decay=0.0, lr_multipliers={},
                                             loss_scaling=False, weight_average_momentum=0.9)
    averaging.build([variable])
    with pytest.raises(ValueError, match="averages 1 variables, not the 2 given"):
        with optimization.averaged_weights(averaging, [variable, keras.Variable(0.0)]):
            pass


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
