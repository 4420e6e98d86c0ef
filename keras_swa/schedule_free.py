"""Schedule-free learning (Defazio et al. 2024, arXiv:2405.15682).

Schedule-free training takes its gradients at `y`, an interpolation between
the base iterate `z` and a running average `x` of the `z`s, and the model to
evaluate is `x`. `ScheduleFree` makes any Keras optimizer the base step of
that recurrence; Keras' own `keras.optimizers.ScheduleFreeAdamW` becomes a
source of averages through `source_of`. Either way the model holds `y`, and
`x` is recovered from `y` and one more copy of the weights: every `source=`
of keras_swa (`assign_average`, `averaged_weights`, `EvaluateAverage`,
`AverageModelCheckpoint`) then evaluates at `x`, BatchNorm recomputed there.
"""

import functools
import numbers
import threading
import warnings

import keras
import numpy as np
from keras import ops

from keras_swa import _validation
from keras_swa import engine
from keras_swa import optimizers
from keras_swa._backend import assign as assign_lib
from keras_swa._backend import distribute
from keras_swa._backend import trace
from keras_swa._backend import variable_value as _value

# `keras.optimizers.ScheduleFreeAdamW` is new in Keras 3.15.
_KERAS_SCHEDULE_FREE = getattr(keras.optimizers, "ScheduleFreeAdamW", None)

# The attributes through which Keras' optimizers keep a momentum of their own.
_MOMENTUM_ATTRIBUTES = ("momentum", "beta_1", "adam_beta_1")


def _check_momentum(momentum) -> float:
    momentum = _validation.real("momentum", momentum, minimum=0.0, below=1.0)
    if momentum == 0.0:
        raise ValueError(
            "`momentum` must be a float > 0 and < 1: the weight of the average "
            "x in y = (1 - momentum) z + momentum x (x is recovered by "
            "dividing by it). Received: momentum=0.0"
        )
    return momentum


def _check_inner(inner_optimizer):
    if isinstance(inner_optimizer, ScheduleFree) or (
        _KERAS_SCHEDULE_FREE is not None
        and isinstance(inner_optimizer, _KERAS_SCHEDULE_FREE)
    ):
        raise ValueError(
            "`inner_optimizer` is already schedule-free "
            f"({type(inner_optimizer).__name__}): wrap the base step, such as "
            "`keras.optimizers.Adam(beta_1=0.0)`. Received: "
            f"inner_optimizer={inner_optimizer}"
        )
    inner_optimizer = optimizers._check_inner_optimizer(inner_optimizer)
    if inner_optimizer.use_ema:
        raise ValueError(
            "`inner_optimizer` must not use `use_ema=True`: schedule-free "
            "already averages, and Keras' EMA would average z, the base "
            "iterate. Received: inner_optimizer with use_ema=True"
        )
    for attribute in _MOMENTUM_ATTRIBUTES:
        value = getattr(inner_optimizer, attribute, None)
        if isinstance(value, numbers.Real) and value > 0:
            warnings.warn(
                f"The base step {type(inner_optimizer).__name__} has a "
                f"momentum of its own ({attribute}={value}); schedule-free "
                "replaces momentum by its interpolation (`momentum` of "
                "ScheduleFree), and the two together are not the method of "
                f"Defazio et al. Set {attribute}=0 on the base step.",
                stacklevel=3,
            )
    return inner_optimizer


def _check_offload(offload):
    if _validation.boolean("offload", offload):
        # Not the other averagers' fold-in off the device: the base step
        # reads and writes z at every update, with the inner optimizer's
        # state; z in host memory would be a CPU optimizer step.
        raise ValueError(
            "ScheduleFree does not support `offload=True`: its state z is the "
            "iterate the inner optimizer steps at every update, so it stays "
            "with the optimizer's state on the accelerator (x, the average, "
            "takes no memory: it is recovered from y and z). Received: "
            "offload=True"
        )


def _average(y, z, beta):
    """x = (y - (1 - beta) z) / beta, in the dtype of z."""
    return (ops.cast(y, z.dtype) - (1.0 - beta) * z) / beta


def _interpolation_weight(lr_max, weight_sum, power):
    """c = lr_max**p / S, or 0 while S is 0 (a learning rate still 0)."""
    return ops.where(
        weight_sum > 0,
        ops.power(lr_max, power) / ops.where(weight_sum > 0, weight_sum, 1.0),
        0.0,
    )


@keras.saving.register_keras_serializable(package="keras_swa")
class ScheduleFree(optimizers.WrappedOptimizer):
    """Schedule-free learning with any Keras optimizer as the base step.

    Schedule-free training (Defazio et al. 2024) replaces the learning-rate
    schedule's decay by an average: the base optimizer steps `z`, the
    average `x` of the `z`s is weighted by the largest learning rate so far
    (`lr_max ** weight_lr_power`), and gradients are taken at
    `y = (1 - momentum) z + momentum x`. The model holds `y` (what `fit`
    trains and `evaluate` sees); evaluate at `x` with
    `keras_swa.averaged_weights(model, bn_data=...)` or write it in with
    `keras_swa.assign_average`, BatchNorm recomputed at `x`.

    Update t (only real updates count, as with
    `gradient_accumulation_steps`), with `lr_t` the inner optimizer's
    learning rate at that update (a schedule's warmup included):
    `z <- inner step of z with the gradient at y`;
    `lr_max <- max(lr_max, lr_t)`; `c = lr_max**p / (S + lr_max**p)`,
    `S <- S + lr_max**p` (`c = 0` while `S` is 0);
    `x <- (1 - c) x + c z`; `y <- (1 - momentum) z + momentum x`; with
    `z = x = y` the initial weights before the first update. The inner
    optimizer's weight decay and the variables' constraints act on `z`.

    Memory: one copy of the trainable weights, `z` (float32 for float16 and
    bfloat16 weights; `x` is `(y - (1 - momentum) z) / momentum`). With
    float16 or bfloat16 weights, `y` and so `x` are only as precise as that
    dtype: train with a mixed-precision policy, whose weights are float32.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` of the base step,
            without momentum of its own (`SGD()`, `Adam(beta_1=0.0)`,
            `AdamW(beta_1=0.0)`, `Lion(beta_1=0.0)`; one with momentum
            warns). Not a `LossScaleOptimizer`, an averaging wrapper, or
            `use_ema=True`.
        momentum: Float in (0, 1), the weight of `x` in `y`. Defaults to
            `0.9`.
        weight_lr_power: Float >= 0, the power `p` of the largest learning
            rate so far in the weight of each `z`. Defaults to `2.0` (`0`
            weighs every update alike).
        offload: Only `False` (z, stepped at every update, stays on the
            accelerator). Defaults to `False`.
        name: String. Defaults to `None` (an automatic name).

    Example:

    >>> opt = keras_swa.ScheduleFree(keras.optimizers.AdamW(
    ...     keras.optimizers.schedules.PolynomialDecay(
    ...         0.0, 100, 1e-3, power=1.0), beta_1=0.0))  # warmup to 1e-3
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, epochs=20)  # doctest: +SKIP
    >>> with keras_swa.averaged_weights(model, bn_data=x):  # doctest: +SKIP
    ...     model.evaluate(x_test, y_test)
    """

    # For the `val_sf_*` metrics of `keras_swa.EvaluateAverage`.
    log_name = "sf"

    def __init__(
        self,
        inner_optimizer,
        momentum=0.9,
        weight_lr_power=2.0,
        offload=False,
        name=None,
        **kwargs,
    ):
        _check_offload(offload)
        if kwargs:
            raise ValueError(
                "ScheduleFree does not support arguments "
                f"`{'`, `'.join(kwargs)}`: set them on the inner optimizer."
            )
        momentum = _check_momentum(momentum)
        weight_lr_power = _validation.real(
            "weight_lr_power", weight_lr_power, minimum=0.0, below=np.inf
        )
        super().__init__(_check_inner(inner_optimizer), name=name)
        self.momentum = momentum
        self.weight_lr_power = weight_lr_power
        self._z = None

        def scalar(dtype, name):
            # The same on every replica: each one makes the same updates.
            return self.add_variable(
                shape=(), dtype=dtype, initializer="zeros",
                aggregation="only_first_replica", name=name,
            )

        self._n_averaged = scalar("int", "n_averaged")
        self._lr_max = scalar("float32", "lr_max")
        self._weight_sum = scalar("float32", "weight_sum")

    def build(self, var_list):
        if self.built:
            return
        for optimizer in (self, self.inner_optimizer):
            distribute.check_distribution(var_list, optimizer=optimizer)
        # `_layout` is private, but it is what Keras' own
        # `add_variable_from_reference` reads: z is sharded like its weight.
        # A float8 layer's variables, overwritten with their gradient, get
        # no z (the inner optimizer overwrites them as usual).
        self._z = [
            None
            if self._overwrite_variable_with_gradient(variable)
            else self.add_variable(
                shape=tuple(variable.shape),
                dtype=engine.average_dtype(variable.dtype),
                name=f"{engine.variable_name(variable)}_z",
                layout=getattr(variable, "_layout", None),
            )
            for variable in var_list
        ]
        # z starts at the initial weights, also where Keras builds the
        # optimizer while tracing the train step (TensorFlow `fit`), which
        # would drop a traced copy.
        with trace.outside_trace():
            for z, variable in zip(self._z, var_list):
                if z is not None:
                    z.assign(ops.copy(ops.cast(_value(variable), z.dtype)))
                    z.constraint = getattr(variable, "constraint", None)
        _exclude_from_weight_decay(self.inner_optimizer, var_list, self._z)
        self.inner_optimizer.build(self._base_variables(var_list))
        super().build(var_list)

    def _base_variables(self, var_list):
        return [v if z is None else z for z, v in zip(self._z, var_list)]

    @property
    def z_variables(self):
        """The base iterates `z`, one per trainable variable, in the same
        order (`None` for a variable overwritten with its gradient)."""
        return [] if self._z is None else list(self._z)

    @property
    def n_averaged(self):
        """Scalar integer variable: the updates made so far."""
        return self._n_averaged

    def apply(self, grads, trainable_variables=None):
        trainable_variables = self._build_for_apply(trainable_variables)
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        z_list = self._z_of(trainable_variables)
        ys = [v for v, z in zip(trainable_variables, z_list) if z is not None]
        zs = [z for z in z_list if z is not None]
        update = self._is_update_step()
        beta, power = self.momentum, self.weight_lr_power
        # Read before the update: the rate this update runs with.
        lr = ops.cast(self.inner_optimizer.learning_rate, "float32")
        assign_lib.assign_where(update, [
            (self._lr_max, ops.maximum, [self._lr_max, lr]),
            (self._weight_sum, lambda s, m: s + ops.power(m, power),
             [self._weight_sum, self._lr_max]),
            (self._n_averaged, lambda n: n + 1, [self._n_averaged]),
        ])
        # y <- x = y - (1 - beta) / beta (z - y), before the base step
        # overwrites the z that x is recovered with.
        assign_lib.lerp_where(update, ys, zs, lambda: (beta - 1.0) / beta)
        self.inner_optimizer.apply(
            [
                g if z is None or g is None or g.dtype == z.dtype
                else ops.cast(g, z.dtype)
                for g, z in zip(grads, z_list)
            ],
            [v if z is None else z for v, z in zip(trainable_variables, z_list)],
        )
        # x <- x + c (z - x); y <- (1 - beta) z + beta x: together, y <- x +
        # (1 - beta (1 - c)) (z - x).
        assign_lib.lerp_where(
            update, ys, zs,
            lambda m, s: 1.0 - beta * (
                1.0 - _interpolation_weight(m, s, power)
            ),
            [self._lr_max, self._weight_sum],
        )

    def _z_of(self, variables):
        """The `z` of each variable (`None` for one without)."""
        z_by_variable = {
            id(variable): z
            for variable, z in zip(self._trainable_variables, self._z)
        }
        unknown = [v for v in variables if id(v) not in z_by_variable]
        if unknown:
            raise ValueError(
                f"{type(self).__name__} was built for other variables than "
                f"{unknown[0].path!r}: build it, or call `apply` the first "
                "time, with all the variables it will update."
            )
        return [z_by_variable[id(v)] for v in variables]

    def _is_update_step(self):
        steps = self.inner_optimizer.gradient_accumulation_steps
        if not steps:
            return True
        # Whether the inner optimizer updates in this call, before it runs:
        # Keras' own test, on its private micro-step counter (the public
        # `iterations` tells only afterwards).
        return ops.equal((self.inner_optimizer._iterations + 1) % steps, 0)

    def assign_average_vars(self, var_list) -> None:
        """Writes the average `x` into the given model variables.

        `x = (y - (1 - momentum) z) / momentum`, with `y` the variable's
        current value. Variables this optimizer does not train (BatchNorm
        statistics, say) are left as they are. Run it eagerly, outside a
        train step.

        Args:
            var_list: List of model variables, such as
                `model.trainable_variables` or `model.variables`.

        Raises:
            ValueError: if no update has been made yet, or `x` is not
                finite; the variables are then left untouched.
        """
        if self._z is None or int(self._n_averaged.numpy()) == 0:
            raise ValueError(
                f"{type(self).__name__} has made no update yet "
                f"(n_averaged=0), so there is no average to assign; nothing "
                f"was changed. {self._schedule()}"
            )
        known = {id(v) for v in self._trainable_variables}
        trained = [v for v in var_list if id(v) in known]
        assign_averages(
            [
                (v, _average(v.value, z.value, self.momentum))
                for v, z in zip(trained, self._z_of(trained))
                if z is not None
            ],
            type(self).__name__,
        )

    def _schedule(self):
        return _schedule(self)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"momentum": self.momentum, "weight_lr_power": self.weight_lr_power}
        )
        return config


def _schedule(optimizer):
    return (
        f"{type(optimizer).__name__} averages from its first update on; "
        f"{int(optimizer._n_averaged.numpy())} update(s) have run so far."
    )


def _exclude_from_weight_decay(inner_optimizer, var_list, zs):
    """Carries the inner optimizer's weight-decay exclusions of the model's
    variables over to their `z`s, which it updates instead.

    `_use_weight_decay` is private, but it is the one place where Keras
    decides, from the exclusions by variable and by name; there is no public
    accessor.
    """
    if inner_optimizer.weight_decay is None:
        return
    excluded = [
        z
        for variable, z in zip(var_list, zs)
        if z is not None and not inner_optimizer._use_weight_decay(variable)
    ]
    if excluded:
        inner_optimizer.exclude_from_weight_decay(var_list=excluded)


def assign_averages(pairs, owner: str) -> None:
    """Writes `(variable, value)` pairs, after checking every value is
    finite; nothing is written otherwise.

    Raises:
        ValueError: naming `owner`, if a value holds NaN or infinity.
    """
    if not engine.all_finite([value for _, value in pairs]):
        raise ValueError(
            f"The average x of {owner} is not finite (NaN or infinity): the "
            "weights diverged. Nothing was changed."
        )
    for variable, value in pairs:
        # A copy: on JAX a variable must not share another's buffer, which
        # `fit` donates.
        variable.assign(ops.copy(ops.cast(value, variable.dtype)))


class _Count:
    """A count read from an optimizer, with the `numpy()` of a variable."""

    def __init__(self, value):
        self._value = value

    def numpy(self):
        if isinstance(self._value, keras.Variable):
            # `Variable.numpy()`: `ops.convert_to_numpy` of a TensorFlow
            # variable warns under NumPy 2.
            return np.asarray(self._value.numpy())
        return np.asarray(ops.convert_to_numpy(self._value))


class KerasScheduleFreeSource:
    """Keras' own `keras.optimizers.ScheduleFreeAdamW` as a source of
    averages: its `x`.

    Keras keeps `z` in the optimizer's `momentum` slots and `y` in the model,
    and never evaluates at `x`; this source writes
    `x = (y - (1 - beta_1) momentum) / beta_1` into the model. Every
    `source=` of keras_swa makes one from the optimizer (also the default
    `model.optimizer`), through `keras_swa.schedule_free.source_of`.

    Two defects of Keras 3.15 (see the docs page "Schedule-free"):

    - On TensorFlow and PyTorch, its update recovers the old `x` from the
      momentum after updating it, which makes `y` itself the running mean
      of the `z`s: the average is the model, and this source evaluates it
      there (`x = y`, BatchNorm recomputed with `bn_data`), with a warning.
      Which update the installed Keras runs is checked once, on a scalar.
    - Under TensorFlow `fit` it loses its copy of the initial weights (the
      optimizer is built inside the traced train step, where the copy into
      the `momentum` slots is dropped: training starts from zeros). Made for
      a model that is about to train so, or whose slots are all zero while
      its weights are not, the source warns and names the workaround.

    Args:
        optimizer: A `keras.optimizers.ScheduleFreeAdamW`.
        model: The `keras.Model` it trains, or `None`. Defaults to `None`.

    Example:

    >>> model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(1e-3),
    ...               loss="mse")  # doctest: +SKIP
    >>> model.optimizer.build(model.trainable_variables)  # doctest: +SKIP
    >>> model.fit(x, y, epochs=10)  # doctest: +SKIP
    >>> keras_swa.assign_average(model, bn_data=x)  # doctest: +SKIP
    """

    log_name = "sf"

    def __init__(self, optimizer, model=None):
        self.optimizer = optimizer
        beta_1 = optimizer.beta_1
        beta_1 = beta_1() if callable(beta_1) else beta_1
        beta_1 = float(ops.convert_to_numpy(beta_1))
        if not 0.0 < beta_1 <= 1.0:
            raise ValueError(
                "A `ScheduleFreeAdamW` with beta_1 outside (0, 1] holds no "
                "recoverable average x = (y - (1 - beta_1) z) / beta_1. "
                f"Received: beta_1={beta_1}"
            )
        self.beta_1 = beta_1
        rule = keras_update_rule(type(optimizer))
        self.average_is_y = rule == "x_from_new_z"
        if rule == "unknown":
            warnings.warn(
                f"Keras {keras.__version__} runs an update of "
                "ScheduleFreeAdamW that keras_swa does not know; it recovers "
                "x = (y - (1 - beta_1) z) / beta_1, as in the published "
                "algorithm.",
                stacklevel=4,
            )
        if self.average_is_y:
            warnings.warn(
                "On this backend Keras' ScheduleFreeAdamW recovers its old x "
                "from the momentum it has just updated (a Keras 3.15 defect), "
                "which makes the model's weights y the running mean of its "
                "iterates z: keras_swa evaluates it there (x = y; BatchNorm "
                "recomputed with `bn_data`). For schedule-free learning as "
                "published, use `keras_swa.ScheduleFree(keras.optimizers."
                "AdamW(beta_1=0.0))`.",
                stacklevel=4,
            )
        _check_initial_copy(optimizer, model)

    @property
    def n_averaged(self):
        """The updates made so far (each one averaged into `x`)."""
        return _Count(self.optimizer.iterations)

    def _slots(self):
        # Keras exposes no public map from a variable to its slots.
        return {
            id(variable): momentum
            for variable, momentum in zip(
                self.optimizer._trainable_variables, self.optimizer._momentums
            )
            if momentum is not None
        }

    def assign_average_vars(self, var_list) -> None:
        """Writes `x` into the given model variables (the others, such as
        BatchNorm statistics, are left as they are).

        Raises:
            ValueError: if no update has been made yet, or `x` is not
                finite; the variables are then left untouched.
        """
        if not self.optimizer.built or int(self.n_averaged.numpy()) == 0:
            raise ValueError(
                "The ScheduleFreeAdamW has made no update yet, so there is "
                f"no average to assign; nothing was changed. {self._schedule()}"
            )
        slots = self._slots()
        assign_averages(
            [
                (v, v.value if self.average_is_y
                 else _average(v.value, _widened(slots[id(v)]), self.beta_1))
                for v in var_list
                if id(v) in slots
            ],
            "ScheduleFreeAdamW",
        )

    def _schedule(self):
        return (
            "Keras' ScheduleFreeAdamW averages from its first update on; "
            f"{int(self.n_averaged.numpy())} update(s) have run so far."
        )

    def __repr__(self):
        return f"<KerasScheduleFreeSource of {self.optimizer.name}>"


def _all_zero(variables) -> bool:
    return not any(
        bool(ops.convert_to_numpy(ops.any(ops.not_equal(_value(v), 0))))
        for v in variables
    )


def _widened(variable):
    return ops.cast(variable.value, engine.average_dtype(variable.dtype))


_LOST_COPY_WORKAROUND = (
    "Build the optimizer before `fit`, after `compile`: "
    "`model.optimizer.build(model.trainable_variables)` (or use "
    "`keras_swa.ScheduleFree(keras.optimizers.Adam(beta_1=0.0))`, which "
    "keeps its copy on every backend)."
)


def _check_initial_copy(optimizer, model):
    """Warns where Keras' ScheduleFreeAdamW lost, or is about to lose, its
    copy of the initial weights (a Keras 3.15 defect)."""
    if not optimizer.built:
        if model is not None and trace.builds_optimizer_in_trace(model):
            warnings.warn(
                "Keras' ScheduleFreeAdamW is not built yet, and TensorFlow "
                "`fit` will build it inside its traced train step, where "
                "Keras drops the copy of the initial weights into its "
                "`momentum` slots: training would start from zero weights "
                f"(a Keras 3.15 defect). {_LOST_COPY_WORKAROUND}",
                stacklevel=4,
            )
        return
    slots = optimizer._momentums
    variables = optimizer._trainable_variables
    if _all_zero([m for m in slots if m is not None]) and not _all_zero(
        variables
    ):
        warnings.warn(
            "The `momentum` slots of Keras' ScheduleFreeAdamW are all zero "
            "while the weights are not: it lost its copy of the initial "
            "weights (a Keras 3.15 defect when TensorFlow `fit` builds it), "
            "and its first update starts from zero weights. "
            f"{_LOST_COPY_WORKAROUND}",
            stacklevel=4,
        )


@functools.lru_cache(maxsize=None)
def keras_update_rule(cls=_KERAS_SCHEDULE_FREE) -> str:
    """Which update Keras' ScheduleFreeAdamW (or its subclass `cls`) runs on
    this backend.

    Two updates of a scalar with learning rate 1, beta_1 = 0.5, beta_2 = 0
    and gradient 1 (each step moves z by -1) from y = z = 1: the update as
    written in Keras (x_old from the old momentum) ends at y = -0.75; with
    x_old from the updated momentum (Keras 3.15.1 on TensorFlow and
    PyTorch, where the old value aliases the variable) at y = -0.5, the
    mean of the two z's. Checked once per process, in a thread of its own:
    outside the caller's `tf.distribute` scope, trace and dtype policy
    (thread-local in TensorFlow and Keras).

    Returns:
        `"as_written"`, `"x_from_new_z"`, or `"unknown"` (another update
        rule: a Keras release newer than keras_swa knows).
    """
    outcome = []

    def probe():
        try:
            optimizer = cls(
                learning_rate=1.0, beta_1=0.5, beta_2=0.0, epsilon=0.0,
                name="keras_swa_probe",
            )
            variable = keras.Variable(
                [1.0], dtype="float32", name="keras_swa_probe"
            )
            for _ in range(2):
                optimizer.apply([ops.ones((1,), "float32")], [variable])
            outcome.append(float(ops.convert_to_numpy(variable.value)[0]))
        except Exception as error:  # raised in the caller's thread below
            outcome.append(error)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return {-0.75: "as_written", -0.5: "x_from_new_z"}.get(
        outcome[0], "unknown"
    )


def source_of(source, model=None):
    """`source` as keras_swa reads averages from it.

    Keras' `keras.optimizers.ScheduleFreeAdamW` becomes a
    `KerasScheduleFreeSource` (its `x`); anything else is returned as it is.

    Args:
        source: A `source=` argument, resolved (`model.optimizer` for
            `None`, the inner optimizer of a `LossScaleOptimizer`).
        model: The model it belongs to, or `None`. Defaults to `None`.

    Returns:
        The source to read averages from.

    Example:

    >>> source = source_of(model.optimizer, model)  # doctest: +SKIP
    >>> source.assign_average_vars(model.trainable_variables)  # doctest: +SKIP
    """
    if _KERAS_SCHEDULE_FREE is not None and isinstance(
        source, _KERAS_SCHEDULE_FREE
    ):
        return KerasScheduleFreeSource(source, model)
    return source
