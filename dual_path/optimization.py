"""The optimizers: the original MatConvNet training's SGD with Nesterov momentum, and Adam(W).

MatConvNet (`cnn_train_dag`, `nesterovUpdate = true`) updates each parameter w with
gradient g (already the batch mean) as

    d = lr_mult * (g + weight_decay * w)        weight decay as an L2 term in the gradient
    v <- momentum * v - d                       v: the velocity, in gradient units
    w <- w + lr * (momentum * v - d)            Nesterov look-ahead

where lr is the schedule's learning rate of the current step and lr_mult the
parameter's own multiplier (1e-3 for the word embedding, the backbone's multiplier in
stage II, 1 elsewhere). The velocity holds gradients, not steps, so a change of lr takes
effect at once, as in MatConvNet (Keras' SGD keeps lr inside its velocity instead).

The learning rate is piecewise constant in the trainer's global step.

`build_optimizer` also offers Keras' Adam and AdamW (OPTIMIZERS). Keras 3 has no
MultiOptimizer, so `_PerVariableLearningRate` gives them the same per-variable multipliers:
each variable's update is computed at lr * lr_mult (Adam's step is invariant to the
gradient's scale, so scaling gradients would not do). Weight decay under "adam" is the L2
term in the gradient, as MatConvNet's, scaled by lr_mult with it; under "adamw" it is
Keras' decoupled decay, w <- w - lr * weight_decay * w at the base lr for every variable.

With `weight_average_momentum` m, any of them keeps Keras' exponential moving average of the
trained weights (use_ema: a <- m * a + (1 - m) * w after each step, a = w after the first);
`averaged_weights` swaps the averages in for a validation, and the optimizer's
`finalize_variable_values` makes them the weights at a stage's end.
"""
import bisect
import contextlib
from typing import Iterator, Mapping, Sequence

import keras
import tensorflow as tf


class PiecewiseConstantSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = values[i], i = the number of boundaries <= step.

    boundaries: increasing global steps at which the next value starts; len(values) ==
    len(boundaries) + 1. step counts the updates done before this one (0 for the first).
    """

    def __init__(self, boundaries: Sequence[int], values: Sequence[float]):
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"a piecewise-constant schedule needs one value more than boundaries, got "
                f"{len(values)} values for {len(boundaries)} boundaries")
        if any(later <= earlier for earlier, later in zip(boundaries, boundaries[1:])):
            raise ValueError(f"schedule boundaries must increase, got {list(boundaries)}")
        self.boundaries = [int(boundary) for boundary in boundaries]
        self.values = [float(value) for value in values]

    def __call__(self, step):
        """float32 scalar learning rate at `step` (int scalar tensor or Python int)."""
        step = tf.cast(step, tf.int64)
        index = tf.reduce_sum(tf.cast(
            step >= tf.constant(self.boundaries, tf.int64, shape=[len(self.boundaries)]), tf.int32))
        return tf.gather(tf.constant(self.values, tf.float32), index)

    def value_at(self, step: int) -> float:
        """The same as __call__ for a Python int, without TensorFlow."""
        return self.values[bisect.bisect_right(self.boundaries, step)]

    def get_config(self):
        return {"boundaries": self.boundaries, "values": self.values}


def schedule_from_flags(boundaries: Sequence[float], values: Sequence[float], unit: str,
                        steps_per_epoch: int) -> PiecewiseConstantSchedule:
    """The schedule of `--stageN_lr_boundaries/values`; unit "epochs" or "steps".

    Boundaries in epochs may be fractional; they are rounded to the nearest step.
    """
    if unit == "epochs":
        steps = [int(round(float(boundary) * steps_per_epoch)) for boundary in boundaries]
    elif unit == "steps":
        steps = [int(boundary) for boundary in boundaries]
    else:
        raise ValueError(f"lr boundary unit must be 'epochs' or 'steps', got {unit!r}")
    return PiecewiseConstantSchedule(steps, values)


OPTIMIZERS = ("matconvnet_sgd", "adam", "adamw")


def _multipliers_by_index(lr_multipliers: Mapping[str, float], variables) -> list[float]:
    """The multiplier of each variable in order (1 where not named); ValueError naming any
    multiplier whose variable is not among `variables`."""
    paths = {variable.path for variable in variables}
    unknown = sorted(set(lr_multipliers) - paths)
    if unknown:
        raise ValueError(f"lr multipliers name variables that are not trained: {unknown}")
    return [float(lr_multipliers.get(variable.path, 1.0)) for variable in variables]


class MatConvNetSGD(keras.optimizers.Optimizer):
    """SGD with (Nesterov) momentum, L2 weight decay in the gradient, per-variable lr multipliers.

    Args:
      learning_rate: a float (held in a variable that the trainer sets from its schedule
        before each step), a LearningRateSchedule of the optimizer's iterations, or a
        zero-argument callable.
      momentum: the velocity's decay (0.9 in the original).
      weight_decay: the L2 coefficient added to the gradient (1e-4 in the original);
        applied to every trained variable, scaled by its multiplier as in MatConvNet.
      nesterov: the Nesterov look-ahead update (MatConvNet's nesterovUpdate).
      lr_multipliers: variable.path -> multiplier; variables not named get 1. Every
        name must be one of the variables the optimizer is built on.
    """

    def __init__(self, learning_rate, momentum: float = 0.9, weight_decay: float = 1e-4,
                 nesterov: bool = True, lr_multipliers: Mapping[str, float] | None = None,
                 name: str = "matconvnet_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum = float(momentum)
        self.l2_weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.lr_multipliers = dict(lr_multipliers or {})

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._multiplier_of_index = _multipliers_by_index(self.lr_multipliers, variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        velocity = self.velocities[index]
        multiplier = self._multiplier_of_index[index]
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        gradient = tf.cast(gradient, variable.dtype)
        learning_rate = tf.cast(learning_rate, variable.dtype)
        direction = multiplier * (gradient + self.l2_weight_decay * variable)
        new_velocity = self.momentum * velocity - direction
        self.assign(velocity, new_velocity)
        step = self.momentum * new_velocity - direction if self.nesterov else new_velocity
        self.assign_add(variable, learning_rate * step)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.l2_weight_decay,
                      nesterov=self.nesterov, lr_multipliers=self.lr_multipliers)
        return config


class _PerVariableLearningRate:
    """Mixin for a Keras optimizer: variable v is updated at lr * lr_multipliers[v.path]
    (1 where not named), plus an optional L2 term l2 * v in the gradient."""

    def __init__(self, *args, lr_multipliers: Mapping[str, float] | None = None,
                 l2_weight_decay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = dict(lr_multipliers or {})
        self.l2_weight_decay = float(l2_weight_decay)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._multiplier_of_index = _multipliers_by_index(self.lr_multipliers, variables)

    def update_step(self, gradient, variable, learning_rate):
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        if self.l2_weight_decay:
            gradient = gradient + tf.cast(self.l2_weight_decay, gradient.dtype) * tf.cast(variable, gradient.dtype)
        multiplier = self._multiplier_of_index[self._get_variable_index(variable)]
        super().update_step(gradient, variable, learning_rate * multiplier)

    def get_config(self):
        config = super().get_config()
        config.update(lr_multipliers=self.lr_multipliers, l2_weight_decay=self.l2_weight_decay)
        return config


class MultipliedAdam(_PerVariableLearningRate, keras.optimizers.Adam):
    """keras.optimizers.Adam with per-variable lr multipliers and L2 weight decay in the gradient."""


class MultipliedAdamW(_PerVariableLearningRate, keras.optimizers.AdamW):
    """keras.optimizers.AdamW (decoupled decay at the base lr) with per-variable lr multipliers."""


def build_optimizer(learning_rate: float, *, momentum: float, weight_decay: float,
                    lr_multipliers: Mapping[str, float], loss_scaling: bool,
                    name: str = "matconvnet_sgd",
                    weight_average_momentum: float | None = None) -> keras.optimizers.Optimizer:
    """The named optimizer (OPTIMIZERS), wrapped in a dynamic LossScaleOptimizer for float16.

    "matconvnet_sgd": MatConvNetSGD (momentum, L2 weight_decay). "adam": Keras Adam (its
    default betas; momentum unused) with weight_decay as an L2 term in the gradient. "adamw":
    Keras AdamW with decoupled weight_decay. All apply lr_multipliers per variable.

    Build it under the strategy's scope. `optimizer.learning_rate` is a variable: assign
    the schedule's value to it before each step (outside `strategy.run`). With
    loss_scaling, scale the loss with `optimizer.scale_loss` before taking gradients;
    `apply` unscales them and skips the steps whose gradients are not finite. With
    weight_average_momentum, the optimizer also keeps the weights' moving average (Keras'
    use_ema, never written over the weights during training: ema_overwrite_frequency None).
    """
    averaging = {"use_ema": weight_average_momentum is not None,
                 "ema_momentum": 0.99 if weight_average_momentum is None else weight_average_momentum}
    if name == "matconvnet_sgd":
        optimizer = MatConvNetSGD(learning_rate, momentum=momentum, weight_decay=weight_decay,
                                  lr_multipliers=lr_multipliers, **averaging)
    elif name == "adam":
        optimizer = MultipliedAdam(learning_rate=learning_rate, lr_multipliers=lr_multipliers,
                                   l2_weight_decay=weight_decay, **averaging)
    elif name == "adamw":
        optimizer = MultipliedAdamW(learning_rate=learning_rate, weight_decay=weight_decay,
                                    lr_multipliers=lr_multipliers, **averaging)
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if loss_scaling:
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


@contextlib.contextmanager
def averaged_weights(optimizer: keras.optimizers.Optimizer, variables) -> Iterator[None]:
    """Within the block, `variables` (those the optimizer was built on, in its order) hold the
    optimizer's moving averages of themselves; after it, their own values again. Without
    use_ema, the block leaves them as they are.

    Keras swaps the averages in only for `model.fit` (keras.callbacks.SwapEMAWeights); the
    trainer's own loop validates mid-stage with this, where finalize_variable_values would
    end the averaging.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not inner.use_ema:
        yield
        return
    averages = inner._model_variables_moving_average
    variables = list(variables)
    if len(averages) != len(variables):
        raise ValueError(f"the optimizer averages {len(averages)} variables, not the "
                         f"{len(variables)} given")

    def swap():
        for variable, average in zip(variables, averages):
            value = tf.identity(variable.value)
            variable.assign(average.value)
            average.assign(value)

    swap()
    try:
        yield
    finally:
        swap()
