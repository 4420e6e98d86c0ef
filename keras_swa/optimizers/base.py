"""The base of the optimizer wrappers: `AveragedOptimizer`, which delegates
to an inner optimizer as Keras' `LossScaleOptimizer` does and folds the new
weights into its averages (a `keras_swa.engine.AverageState`) on snapshot steps,
inside the compiled train step."""

import warnings

import keras
from keras import ops

from keras_swa import _validation
from keras_swa import averaging
from keras_swa import engine
from keras_swa._backend import compiled
from keras_swa._backend import distribute
from keras_swa.optimizers import wrapper


def check_inner_optimizer(inner_optimizer):
    """The inner optimizer of a wrapper, checked (a name or config of
    `keras.optimizers.get` made into an optimizer).

    Raises:
        ValueError, TypeError: naming `inner_optimizer`.
    """
    if isinstance(inner_optimizer, (str, dict)):
        # What `compile(optimizer=...)` accepts: "sgd", a config dict.
        try:
            inner_optimizer = keras.optimizers.get(inner_optimizer)
        except ValueError as error:
            raise ValueError(
                "`inner_optimizer` must be a `keras.optimizers.Optimizer` or "
                "a name or config `keras.optimizers.get` knows, such as "
                f'"sgd". Received: inner_optimizer={inner_optimizer!r}'
            ) from error
    if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "`inner_optimizer` must not be a LossScaleOptimizer: wrap the "
            "plain optimizer (with the mixed_float16 policy Keras adds the "
            "loss scaling around the averaging wrapper by itself), or write "
            "`LossScaleOptimizer(SWA(optimizer))`. Received: "
            f"inner_optimizer={inner_optimizer}"
        )
    # `assign_average_vars`: any keras_swa averager (`ScheduleFree` too,
    # which this module cannot import); Keras' own schedule-free optimizer
    # leaves its model at y, whose average is not the schedule-free x.
    keras_schedule_free = getattr(keras.optimizers, "ScheduleFreeAdamW", None)
    if isinstance(inner_optimizer, AveragedOptimizer) or hasattr(
        inner_optimizer, "assign_average_vars"
    ) or (
        keras_schedule_free is not None
        and isinstance(inner_optimizer, keras_schedule_free)
    ):
        raise ValueError(
            "`inner_optimizer` is already an averaging optimizer "
            f"({type(inner_optimizer).__name__}); averaging an average is "
            "not supported (a schedule-free optimizer's model holds y, not "
            "its average x). Received: "
            f"inner_optimizer={inner_optimizer}"
        )
    if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "`inner_optimizer` must be a `keras.optimizers.Optimizer` "
            "instance, such as `keras.optimizers.SGD(0.1)`. Received: "
            f"inner_optimizer={inner_optimizer!r} of type "
            f"{type(inner_optimizer).__name__}"
        )
    return inner_optimizer


@keras.saving.register_keras_serializable(package="keras_swa")
class AveragedOptimizer(wrapper.WrappedOptimizer, engine.Averager):
    """An optimizer wrapper that averages the weights it produces.

    The base of `SWA` and `EMA`, and public so that a custom averaging rule
    takes a few lines, as `avg_fn` does in `torch.optim.swa_utils`: subclass
    it and define `average_weight(n_averaged)`, the weight `t` of the next
    snapshot in `average <- average + t * (weights - average)`, or, for a
    rule that reads the step or the learning rate or keeps running scalars,
    `averaging_rule()`. Everything else is shared by every averager of
    keras_swa (the averaging engine, `keras_swa.engine`): the snapshot
    schedule, float32 averages for float16 and bfloat16 weights, the rule's
    weight in float64 for float64 weights, the fold-in inside the compiled
    train step on each backend, host offload, delegation to the inner
    optimizer, copying the averages into a model and serialization.

    Snapshots: after update `i` (0-based: the inner optimizer's `iterations`
    before it), the weights are folded in if `i >= start_averaging` and
    `(i - start_averaging) % average_period == 0`. Only real updates count:
    gradient-accumulation micro-steps are not snapshots.

    Non-finite weights: with `skip_non_finite=False`, a snapshot is folded in
    whatever it holds, at no extra cost; weights that diverge (NaN) then
    make the averages NaN, which `assign_average_vars`, `assign_average` and
    `averaged_weights` refuse with an error, and `fit` warns at its end. With
    `skip_non_finite=True` a snapshot whose weights are not all finite is
    skipped inside the train step (not counted in `n_averaged`), at the cost
    of one more read of the weights on snapshot steps.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` that computes the
            updates. It must not be a `LossScaleOptimizer` or another
            averaging wrapper.
        start_averaging: Integer >= 0, the 0-based index of the first update
            whose result is averaged. Defaults to `0`.
        average_period: Integer >= 1, the number of updates between two
            snapshots. Defaults to `1`.
        skip_non_finite: Boolean, whether snapshots of weights that hold NaN
            or infinity are skipped. Defaults to `False`.
        offload: Boolean, whether the averages live in host memory (the CPU
            device on TensorFlow, pinned host memory on JAX, CPU tensors on
            PyTorch), off the accelerator; each snapshot copies the weights
            there. Defaults to `False`: beside the weights, sharded like
            them.
        name: String, the name of the optimizer. Defaults to `None`.

    Example:

    A weighted running mean in which the `n`-th snapshot weighs `n`:

    >>> class LinearlyWeighted(keras_swa.AveragedOptimizer):
    ...     def average_weight(self, n_averaged):
    ...         n = keras.ops.cast(n_averaged, "float32")
    ...         return 2.0 / (n + 2.0)
    >>> opt = LinearlyWeighted(keras.optimizers.SGD(0.1))
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    """

    # The kind of average, for the `val_<log_name>_*` metrics of
    # `keras_swa.EvaluateAverage`.
    log_name = "avg"
    # The window of the averages (`keras_swa.SWA` sets it); `None`: all
    # snapshots, by the rule.
    window = None

    def __init__(
        self,
        inner_optimizer,
        start_averaging=0,
        average_period=1,
        skip_non_finite=False,
        offload=False,
        name=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"{type(self).__name__} does not support arguments "
                f"`{'`, `'.join(kwargs)}`: set them on the inner optimizer."
            )
        inner_optimizer = check_inner_optimizer(inner_optimizer)
        start_averaging = _validation.integer(
            "start_averaging", start_averaging, 0
        )
        average_period = _validation.integer(
            "average_period", average_period, 1
        )
        skip_non_finite = _validation.boolean(
            "skip_non_finite", skip_non_finite
        )
        offload = _validation.boolean("offload", offload)
        super().__init__(inner_optimizer, name=name)
        self.start_averaging = start_averaging
        self.average_period = average_period
        self.skip_non_finite = skip_non_finite
        self.offload = offload
        self._averages = None
        # Created now (not in `build`) so that it can be read before the
        # first step. "only_first_replica": every replica folds in the same
        # synchronized weights, so the count is that of one replica.
        self._n_averaged = self.add_variable(
            shape=(),
            dtype="int",
            initializer="zeros",
            aggregation="only_first_replica",
            name="n_averaged",
        )

    def average_weight(self, n_averaged):
        """The weight of the next snapshot: define it in a subclass.

        Called inside the compiled train step on snapshot steps.

        Args:
            n_averaged: Integer scalar tensor, the snapshots folded in before
                this one.

        Returns:
            A float32 scalar tensor `t` in [0, 1]:
            `average <- average + t * (weights - average)`. With
            `n_averaged == 0` it should be 1 (the first snapshot is copied).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define `average_weight(n_averaged)`, "
            "the weight of the next snapshot."
        )

    def averaging_rule(self) -> averaging.Rule:
        """The rule that weighs each snapshot: define it in a subclass whose
        rule reads more than the count.

        A `keras_swa.averaging.Rule` sees the snapshot count, the update's
        step (0-based) and learning rate (the inner optimizer's, its
        schedule at that update), and the dtype in which to compute (float64
        for float64 weights); it may carry running scalars of its own, which
        are saved with the averages. Called once, when the optimizer is
        built.

        Returns:
            A `keras_swa.averaging.Rule`. Defaults to `average_weight`, cast
            to the averages' dtype.
        """
        return averaging.CountRule(self.average_weight)

    def build(self, var_list):
        if self.built:
            return
        # Before any variable exists: a model and a wrapper of different
        # tf.distribute scopes otherwise fail later, with cryptic errors.
        for optimizer in (self, self.inner_optimizer):
            distribute.check_distribution(var_list, optimizer=optimizer)
        # Variables a float8 layer overwrites with its gradient have no
        # meaningful average; they get `None`, as in Keras' own optimizers.
        self._averages = self._new_averages(
            var_list,
            excluded=[
                variable
                for variable in var_list
                if self._overwrite_variable_with_gradient(variable)
            ],
            rule=self.averaging_rule(),
        )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    def load_own_variables(self, store):
        if not wrapper.load_inner_only(self, store):
            super().load_own_variables(store)

    def _new_averages(self, var_list, excluded, rule, name="average"):
        """An `engine.AverageState` of `var_list` kept in optimizer variables,
        counted by `n_averaged`, placed as `offload` says."""
        return engine.AverageState(
            var_list,
            self._n_averaged,
            lambda shape, dtype, name, layout: self.add_variable(
                shape=shape, dtype=dtype, name=name, layout=layout
            ),
            excluded=excluded,
            name=name,
            rule=rule,
            window=self.window,
            offload=self.offload,
        )

    def apply(self, grads, trainable_variables=None):
        trainable_variables = self._build_for_apply(trainable_variables)
        _apply_and_add_snapshot(self, grads, trainable_variables)

    def _iterations_in_python(self):
        return engine.python_int(self.inner_optimizer.iterations)

    def _snapshots_every_update(self):
        return (
            self.start_averaging == 0
            and self.average_period == 1
            and not self.inner_optimizer.gradient_accumulation_steps
        )

    def _add_snapshot(self, snapshot, step, learning_rate):
        self._averages.add_snapshot(
            snapshot,
            skip_non_finite=self.skip_non_finite,
            step=step,
            learning_rate=learning_rate,
        )

    def _schedule(self):
        return (
            f"{type(self).__name__} averages from update {self.start_averaging}"
            f" (start_averaging) every {self.average_period} update(s) "
            f"(average_period); {self._iterations_in_python()} update(s) "
            "have run so far."
        )

    def finalize_variable_values(self, var_list):
        # Keras calls this at the end of `fit`. The averages of this wrapper
        # never overwrite the model by themselves, but an average that a
        # user would find missing or broken only later is said now.
        super().finalize_variable_values(var_list)
        if self._averages is not None:
            _warn_unusable_averages(self)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "start_averaging": self.start_averaging,
                "average_period": self.average_period,
                "skip_non_finite": self.skip_non_finite,
                "offload": self.offload,
            }
        )
        return config


def _apply_and_add_snapshot(wrapper, grads, trainable_variables):
    """The inner optimizer's update, then the snapshot where the schedule
    says so, inside the compiled train step."""
    # The index of this update is the inner optimizer's `iterations`
    # before it, and its learning rate is read before it too. With
    # gradient accumulation a micro-step leaves `iterations` unchanged,
    # which is how real updates are told apart.
    learning_rate = None
    if wrapper._averages.rule.uses_learning_rate:
        learning_rate = ops.copy(wrapper.inner_optimizer.learning_rate)
    if wrapper._snapshots_every_update():
        # Known while tracing: no branch, so that the compiler can fuse
        # the averaging pass with the inner update (and no read into
        # Python on PyTorch).
        step = ops.copy(wrapper.inner_optimizer.iterations)
        wrapper.inner_optimizer.apply(grads, trainable_variables)
        wrapper._add_snapshot(True, step, learning_rate)
        return
    if compiled.python_control_flow():
        step = wrapper._iterations_in_python()
        wrapper.inner_optimizer.apply(grads, trainable_variables)
        wrapper._add_snapshot(
            wrapper._iterations_in_python() != step
            and averaging.is_snapshot_step(
                step, wrapper.start_averaging, wrapper.average_period
            ),
            step,
            learning_rate,
        )
        return
    step = ops.copy(wrapper.inner_optimizer.iterations)
    wrapper.inner_optimizer.apply(grads, trainable_variables)
    updated = ops.not_equal(wrapper.inner_optimizer.iterations, step)
    snapshot = ops.logical_and(
        updated,
        averaging.is_snapshot_step(
            step, wrapper.start_averaging, wrapper.average_period
        ),
    )
    wrapper._add_snapshot(snapshot, step, learning_rate)


def _warn_unusable_averages(wrapper) -> None:
    """Warns, at the end of `fit`, of averages that cannot be assigned."""
    owner = type(wrapper).__name__
    if wrapper._averages.n_averaged == 0:
        warnings.warn(
            f"{owner} has averaged no snapshot by the end of `fit`: "
            f"{wrapper._schedule()} Train longer or lower `start_averaging`; "
            "the averages cannot be assigned yet.",
            stacklevel=3,
        )
    elif not wrapper._averages.averages_finite():
        warnings.warn(
            f"The averages of {owner} are not finite (NaN or infinity) at the "
            "end of `fit`: the weights diverged and a snapshot folded them "
            "in. Pass `skip_non_finite=True` to keep the average of the "
            "finite snapshots.",
            stacklevel=3,
        )
