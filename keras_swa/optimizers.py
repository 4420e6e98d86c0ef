"""Optimizer wrappers that keep averaged weights inside the train step.

`SWA` and `EMA` wrap any Keras optimizer the way Keras' own
`LossScaleOptimizer` does: the inner optimizer computes the update, then the
wrapper folds the new weights into its averages on snapshot steps. Everything
runs in the compiled train step; a step that takes no snapshot does no work
over the weights.
"""

import keras
from keras import ops

import warnings

from keras_swa import _validation
from keras_swa import averaging
from keras_swa import engine
from keras_swa._backend import compiled
from keras_swa._backend import distribute


def _check_inner_optimizer(inner_optimizer):
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
    if isinstance(inner_optimizer, AveragedOptimizer):
        raise ValueError(
            "`inner_optimizer` is already an averaging wrapper "
            f"({type(inner_optimizer).__name__}); averaging an average is "
            "not supported. Received: "
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
class AveragedOptimizer(keras.optimizers.Optimizer, engine.Averager):
    """An optimizer wrapper that averages the weights it produces.

    The base of `SWA` and `EMA`, and public so that a custom averaging rule
    takes a few lines, as `avg_fn` does in `torch.optim.swa_utils`: subclass
    it and define `average_weight(n_averaged)`, the weight `t` of the next
    snapshot in `average <- average + t * (weights - average)`. Everything
    else is shared by every averager of keras_swa (the averaging engine,
    `keras_swa.engine`): the snapshot schedule, float32 averages for float16
    and bfloat16 weights, the fold-in inside the compiled train step on each
    backend, delegation to the inner optimizer, copying the averages into a
    model and serialization.

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

    def __init__(
        self,
        inner_optimizer,
        start_averaging=0,
        average_period=1,
        skip_non_finite=False,
        name=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"{type(self).__name__} does not support arguments "
                f"`{'`, `'.join(kwargs)}`: set them on the inner optimizer."
            )
        inner_optimizer = _check_inner_optimizer(inner_optimizer)
        start_averaging = _validation.integer(
            "start_averaging", start_averaging, 0
        )
        average_period = _validation.integer(
            "average_period", average_period, 1
        )
        skip_non_finite = _validation.boolean(
            "skip_non_finite", skip_non_finite
        )
        # The wrapper's own learning rate is never used: it delegates to the
        # inner optimizer, as LossScaleOptimizer does.
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.start_averaging = start_averaging
        self.average_period = average_period
        self.skip_non_finite = skip_non_finite
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
        step and learning rate, and the dtype in which to compute (float64
        for float64 variables), and may carry running scalars of its own,
        which are saved with the averages. Called once, when the optimizer
        is built.

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
        self._averages = engine.Averages(
            var_list,
            self._n_averaged,
            lambda shape, dtype, name, layout: self.add_variable(
                shape=shape, dtype=dtype, name=name, layout=layout
            ),
            excluded=[
                variable
                for variable in var_list
                if self._overwrite_variable_with_gradient(variable)
            ],
            rule=self.averaging_rule(),
        )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "The optimizer must be built before `apply` without "
                    "`trainable_variables`: call "
                    "`optimizer.build(trainable_variables)` first."
                )
            trainable_variables = list(trainable_variables)
            self.build(trainable_variables)
        if self._snapshots_every_update():
            # Known while tracing: no branch, so that the compiler can fuse
            # the averaging pass with the inner update.
            self.inner_optimizer.apply(grads, trainable_variables)
            self._fold_in(True)
            return
        # The index of this update is the inner optimizer's `iterations`
        # before it. With gradient accumulation a micro-step leaves
        # `iterations` unchanged, which is how real updates are told apart.
        if compiled.python_control_flow():
            step = self._iterations_in_python()
            self.inner_optimizer.apply(grads, trainable_variables)
            self._fold_in(
                self._iterations_in_python() != step
                and averaging.is_snapshot_step(
                    step, self.start_averaging, self.average_period
                )
            )
            return
        step = ops.copy(self.inner_optimizer.iterations)
        self.inner_optimizer.apply(grads, trainable_variables)
        updated = ops.not_equal(self.inner_optimizer.iterations, step)
        snapshot = ops.logical_and(
            updated,
            averaging.is_snapshot_step(
                step, self.start_averaging, self.average_period
            ),
        )
        self._fold_in(snapshot)

    def _iterations_in_python(self):
        return engine.python_int(self.inner_optimizer.iterations)

    def _snapshots_every_update(self):
        return (
            self.start_averaging == 0
            and self.average_period == 1
            and not self.inner_optimizer.gradient_accumulation_steps
        )

    def _fold_in(self, snapshot):
        self._averages.fold_in(snapshot, skip_non_finite=self.skip_non_finite)

    def _schedule(self):
        updates = self._iterations_in_python()
        return (
            f"{type(self).__name__} averages from update {self.start_averaging}"
            f" (start_averaging) every {self.average_period} update(s) "
            f"(average_period); {updates} update(s) have run so far."
        )

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from the inner optimizer's weight decay.

        As `keras.optimizers.Optimizer.exclude_from_weight_decay`: call it
        before the optimizer is built.
        """
        self.inner_optimizer.exclude_from_weight_decay(
            var_list=var_list, var_names=var_names
        )

    def load_own_variables(self, store):
        # A checkpoint of the same model trained with the bare inner
        # optimizer holds only the inner optimizer's variables. Keras would
        # skip them all with a warning (momentum lost, `iterations` back to
        # 0, so `start_averaging` would count from the restart); they belong
        # to the inner optimizer, and the averages start empty.
        inner_count = len(self.inner_optimizer.variables)
        if (
            self.built
            and len(store.keys()) == inner_count
            and inner_count != len(self.variables)
        ):
            inner = self.inner_optimizer
            inner.load_own_variables(store)
            # Keras' saving then visits the inner optimizer at a path of its
            # own, which such a checkpoint lacks: that one visit must not
            # warn that it skipped the state just loaded.
            load = inner.load_own_variables

            def skip_the_empty_visit(nested_store):
                del inner.load_own_variables
                if len(nested_store.keys()):
                    load(nested_store)

            inner.load_own_variables = skip_the_empty_visit
            return
        super().load_own_variables(store)

    def finalize_variable_values(self, var_list):
        # Keras calls this at the end of `fit`. The inner optimizer's own
        # `use_ema` still applies; the averages of this wrapper never
        # overwrite the model by themselves, but an average that a user
        # would find missing or broken only later is said now.
        self.inner_optimizer.finalize_variable_values(var_list)
        if self._averages is None:
            return
        if self._averages.n_averaged == 0:
            warnings.warn(
                f"{type(self).__name__} has averaged no snapshot by the end "
                f"of `fit`: {self._schedule()} Train longer or lower "
                "`start_averaging`; the averages cannot be assigned yet.",
                stacklevel=2,
            )
        elif not self._averages.averages_finite():
            warnings.warn(
                f"The averages of {type(self).__name__} are not finite (NaN "
                "or infinity) at the end of `fit`: the weights diverged and "
                "a snapshot folded them in. Pass `skip_non_finite=True` to "
                "keep the average of the finite snapshots.",
                stacklevel=2,
            )

    def get_config(self):
        # Not super().get_config(): the base arguments belong to the inner
        # optimizer.
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "start_averaging": self.start_averaging,
            "average_period": self.average_period,
            "skip_non_finite": self.skip_non_finite,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner_optimizer = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner_optimizer, **config)


@keras.saving.register_keras_serializable(package="keras_swa")
class SWA(AveragedOptimizer):
    """Stochastic Weight Averaging (Izmailov et al., 2018) as an optimizer.

    Keeps the equal-weight mean of the weights after updates
    `start_averaging`, `start_averaging + average_period`, ... (the
    `tensorflow_addons.optimizers.SWA` rule, step for step). The model keeps
    training on its own weights; copy the average in when you want it, with
    `keras_swa.assign_average`, `keras_swa.averaged_weights` or
    `assign_average_vars`.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap.
        start_averaging: Integer >= 0, the first update (0-based) to average.
            Defaults to `0`.
        average_period: Integer >= 1, updates between two snapshots.
            Defaults to `10`.
        skip_non_finite: Boolean, whether a snapshot of weights holding NaN
            or infinity is skipped (see `keras_swa.AveragedOptimizer`).
            Defaults to `False`.
        name: String. Defaults to `None` (an automatic name).

    Example:

    >>> opt = keras_swa.SWA(keras.optimizers.SGD(0.05, momentum=0.9),
    ...                     start_averaging=1000, average_period=100)
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, epochs=20)  # doctest: +SKIP
    >>> keras_swa.assign_average(model, bn_data=x)  # doctest: +SKIP
    """

    def __init__(
        self,
        inner_optimizer,
        start_averaging=0,
        average_period=10,
        skip_non_finite=False,
        name=None,
        **kwargs,
    ):
        super().__init__(
            inner_optimizer,
            start_averaging=start_averaging,
            average_period=average_period,
            skip_non_finite=skip_non_finite,
            name=name,
            **kwargs,
        )

    log_name = "swa"

    def average_weight(self, n_averaged):
        return averaging.swa_weight(n_averaged)

    def averaging_rule(self):
        return averaging.Uniform()


@keras.saving.register_keras_serializable(package="keras_swa")
class EMA(AveragedOptimizer):
    """An exponential moving average of the weights, as an optimizer wrapper.

    At each snapshot step, `average <- decay * average + (1 - decay) * w`
    (the first snapshot copies `w`). With `warmup=True` the decay ramps up
    as `min(decay, (1 + n) / (10 + n))` for the `n`-th snapshot, so early
    weights do not linger. Unlike Keras' `use_ema=True`, the model weights are
    never overwritten behind your back, and the average survives saving.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap.
        decay: Float in [0, 1), the weight of the old average. Defaults to
            `0.999`.
        start_averaging: Integer >= 0, the first update (0-based) to average.
            Defaults to `0`.
        average_period: Integer >= 1, updates between two snapshots.
            Defaults to `1`.
        warmup: Boolean, whether to ramp the decay up. Defaults to `False`.
        skip_non_finite: Boolean, whether a snapshot of weights holding NaN
            or infinity is skipped (see `keras_swa.AveragedOptimizer`).
            Defaults to `False`.
        name: String. Defaults to `None` (an automatic name).

    Example:

    >>> opt = keras_swa.EMA(keras.optimizers.AdamW(1e-3), decay=0.999)
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, epochs=20)  # doctest: +SKIP
    >>> with keras_swa.averaged_weights(model):  # doctest: +SKIP
    ...     model.evaluate(x_test, y_test)
    """

    def __init__(
        self,
        inner_optimizer,
        decay=0.999,
        start_averaging=0,
        average_period=1,
        warmup=False,
        skip_non_finite=False,
        name=None,
        **kwargs,
    ):
        decay = _validation.real("decay", decay, minimum=0.0, below=1.0)
        warmup = _validation.boolean("warmup", warmup)
        super().__init__(
            inner_optimizer,
            start_averaging=start_averaging,
            average_period=average_period,
            skip_non_finite=skip_non_finite,
            name=name,
            **kwargs,
        )
        self.decay = decay
        self.warmup = warmup

    log_name = "ema"

    def average_weight(self, n_averaged):
        return averaging.ema_weight(n_averaged, self.decay, self.warmup)

    def averaging_rule(self):
        return averaging.Exponential(self.decay, self.warmup)

    def get_config(self):
        config = super().get_config()
        config.update({"decay": self.decay, "warmup": self.warmup})
        return config


# The smallest exponent: that of the widest profile, `MAX_SIGMA_REL`.
_MIN_GAMMA = averaging.sigma_rel_to_gamma(averaging.MAX_SIGMA_REL)


def _check_sigma_rel(name, value):
    value = _validation.real(
        name, value, minimum=0.0, below=averaging.MAX_SIGMA_REL
    )
    if value == 0.0:
        raise ValueError(
            f"`{name}` must be a float > 0 and < {averaging.MAX_SIGMA_REL} "
            f"(a relative width of the EMA profile). Received: {name}={value}"
        )
    return value


def _power_profile(sigma_rel, gamma):
    """Checks that exactly one of `sigma_rel`, `gamma` is given; returns
    both, as floats."""
    if (sigma_rel is None) == (gamma is None):
        raise ValueError(
            "Give exactly one of `sigma_rel` (the relative width of the EMA, "
            f"in (0, {averaging.MAX_SIGMA_REL})) and `gamma` (its exponent); "
            "each determines the other. Received: "
            f"sigma_rel={sigma_rel!r}, gamma={gamma!r}"
        )
    if sigma_rel is not None:
        sigma_rel = _check_sigma_rel("sigma_rel", sigma_rel)
        return sigma_rel, averaging.sigma_rel_to_gamma(sigma_rel)
    gamma = _validation.real("gamma", gamma, below=float("inf"))
    if not gamma > _MIN_GAMMA:
        raise ValueError(
            f"`gamma` must be a float > {_MIN_GAMMA:.6f}, the exponent of "
            f"sigma_rel={averaging.MAX_SIGMA_REL} (narrower profiles have "
            f"larger exponents). Received: gamma={gamma}"
        )
    return averaging.gamma_to_sigma_rel(gamma), gamma


@keras.saving.register_keras_serializable(package="keras_swa")
class PowerEMA(AveragedOptimizer):
    """The power-function EMA of Karras et al. (2024), as an optimizer wrapper.

    An EMA whose length grows with training: at the `k`-th snapshot,
    `average <- beta * average + (1 - beta) * w` with
    `beta = (1 - 1/k) ** (gamma + 1)` (the first snapshot copies `w`). After
    `k` snapshots, snapshot `i` weighs about `(gamma + 1) i**gamma /
    k**(gamma + 1)`: the average always spans the same fraction of training,
    `sigma_rel`, the standard deviation of that profile relative to its
    length (`sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))`).
    Give `sigma_rel` or `gamma`; both are readable. Karras et al. report
    `sigma_rel` around 0.05 to 0.15 as good for diffusion models; to choose
    it after training, use `keras_swa.PostHocEMA` with
    `keras_swa.EMASnapshots` and `keras_swa.reconstruct_ema`.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap.
        sigma_rel: Float in (0, 0.28), the relative width of the profile.
            Defaults to `None` (then give `gamma`).
        gamma: Float > 0.169 (the exponent of sigma_rel=0.28), the exponent
            of the profile. Defaults to `None` (then give `sigma_rel`).
        start_averaging: Integer >= 0, the first update (0-based) to average.
            Defaults to `0`.
        average_period: Integer >= 1, updates between two snapshots; `k`
            counts snapshots. Defaults to `1`.
        skip_non_finite: Boolean, whether a snapshot of weights holding NaN
            or infinity is skipped (see `keras_swa.AveragedOptimizer`).
            Defaults to `False`.
        name: String. Defaults to `None` (an automatic name).

    Example:

    >>> opt = keras_swa.PowerEMA(keras.optimizers.AdamW(1e-3), sigma_rel=0.1)
    >>> round(opt.gamma, 3)
    6.937
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, epochs=20)  # doctest: +SKIP
    >>> with keras_swa.averaged_weights(model):  # doctest: +SKIP
    ...     model.evaluate(x_test, y_test)
    """

    log_name = "ema"

    def __init__(
        self,
        inner_optimizer,
        sigma_rel=None,
        gamma=None,
        start_averaging=0,
        average_period=1,
        skip_non_finite=False,
        name=None,
        **kwargs,
    ):
        given = "sigma_rel" if gamma is None else "gamma"
        sigma_rel, gamma = _power_profile(sigma_rel, gamma)
        super().__init__(
            inner_optimizer,
            start_averaging=start_averaging,
            average_period=average_period,
            skip_non_finite=skip_non_finite,
            name=name,
            **kwargs,
        )
        self._sigma_rel, self._gamma = sigma_rel, gamma
        # The config holds the argument that was given, so that it
        # round-trips exactly (the other one is derived from it).
        self._given = {
            "sigma_rel": sigma_rel if given == "sigma_rel" else None,
            "gamma": gamma if given == "gamma" else None,
        }

    @property
    def sigma_rel(self) -> float:
        """The relative width of the EMA profile."""
        return self._sigma_rel

    @property
    def gamma(self) -> float:
        """The exponent of the EMA profile."""
        return self._gamma

    def average_weight(self, n_averaged):
        return averaging.power_ema_weight(n_averaged, self._gamma)

    def averaging_rule(self):
        return averaging.PowerFunction(self._gamma)

    def _power_profiles(self):
        return [(self._sigma_rel, self._gamma, self._averages)]

    def get_config(self):
        config = super().get_config()
        config.update(self._given)
        return config


@keras.saving.register_keras_serializable(package="keras_swa")
class PostHocEMA(AveragedOptimizer):
    """Several power-function EMAs at once, to choose the EMA after training.

    Keeps one `keras_swa.PowerEMA` average per entry of `sigma_rels` (its
    "profile"), all folded in by one pass over the weights inside the train
    step. With `keras_swa.EMASnapshots` writing the profiles to disk every
    so many steps, `keras_swa.reconstruct_ema` then builds the power EMA of
    any other `sigma_rel` after training (Karras et al. 2024, "post-hoc
    EMA"), so the EMA length is tuned without retraining.

    Each profile is a source of averages for `keras_swa.assign_average`,
    `keras_swa.averaged_weights` and the other functions that take a
    `source`: `opt.profiles[i]`. The optimizer itself stands for its first
    profile: `average_variables`, `assign_average_vars` and a default
    `source` of `model.optimizer` give the averages of `sigma_rels[0]`.
    `n_averaged` is shared: every profile takes every snapshot.

    Memory: one copy of the trainable weights per profile (float32 for
    float16 and bfloat16 weights).

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap.
        sigma_rels: Tuple of distinct floats in (0, 0.28), the relative
            widths of the profiles kept. Defaults to `(0.05, 0.10)`, the
            pair of Karras et al.
        start_averaging: Integer >= 0, the first update (0-based) to average.
            Defaults to `0`.
        average_period: Integer >= 1, updates between two snapshots.
            Defaults to `1`.
        skip_non_finite: Boolean, whether a snapshot of weights holding NaN
            or infinity is skipped by all profiles (see
            `keras_swa.AveragedOptimizer`). Defaults to `False`.
        name: String. Defaults to `None` (an automatic name).

    Example:

    >>> opt = keras_swa.PostHocEMA(keras.optimizers.AdamW(1e-3))
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, epochs=20, callbacks=[
    ...     keras_swa.EMASnapshots("ema_snapshots", every_n_steps=1000)
    ... ])  # doctest: +SKIP
    >>> with keras_swa.averaged_weights(model, source=opt.profiles[1]):
    ...     model.evaluate(x_test, y_test)  # doctest: +SKIP
    >>> keras_swa.reconstruct_ema(model, "ema_snapshots",
    ...                           sigma_rel=0.08)  # doctest: +SKIP
    """

    log_name = "ema"

    def __init__(
        self,
        inner_optimizer,
        sigma_rels=(0.05, 0.10),
        start_averaging=0,
        average_period=1,
        skip_non_finite=False,
        name=None,
        **kwargs,
    ):
        if not isinstance(sigma_rels, (list, tuple)) or not sigma_rels:
            raise TypeError(
                "`sigma_rels` must be a non-empty tuple or list of floats in "
                f"(0, {averaging.MAX_SIGMA_REL}), such as (0.05, 0.10). "
                f"Received: sigma_rels={sigma_rels!r:.200} of type "
                f"{type(sigma_rels).__name__}"
            )
        sigma_rels = tuple(
            _check_sigma_rel("sigma_rels", sigma_rel) for sigma_rel in sigma_rels
        )
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(
                "`sigma_rels` must be distinct: two equal profiles hold the "
                f"same average twice. Received: sigma_rels={sigma_rels}"
            )
        super().__init__(
            inner_optimizer,
            start_averaging=start_averaging,
            average_period=average_period,
            skip_non_finite=skip_non_finite,
            name=name,
            **kwargs,
        )
        self.sigma_rels = sigma_rels
        self.gammas = tuple(map(averaging.sigma_rel_to_gamma, sigma_rels))
        self._profile_averages = None

    def average_weight(self, n_averaged):
        """The weight of the next snapshot in the first profile."""
        return averaging.power_ema_weight(n_averaged, self.gammas[0])

    def averaging_rule(self):
        return averaging.PowerFunction(self.gammas[0])

    def build(self, var_list):
        if self.built:
            return
        # The base creates the first profile's averages (`_averages`); the
        # others are created beside them, with the same exclusions.
        super().build(var_list)
        excluded = [
            variable
            for variable, average in zip(
                self._averages.variables, self._averages.averages
            )
            if average is None
        ]
        self._profile_averages = [self._averages] + [
            engine.Averages(
                var_list,
                self._n_averaged,
                lambda shape, dtype, name, layout: self.add_variable(
                    shape=shape, dtype=dtype, name=name, layout=layout
                ),
                excluded=excluded,
                name=f"average_{index}",
                rule=averaging.PowerFunction(self.gammas[index]),
            )
            for index in range(1, len(self.sigma_rels))
        ]

    def _fold_in(self, snapshot):
        engine.fold_in_together(
            self._profile_averages, snapshot, self.skip_non_finite
        )

    @property
    def profiles(self):
        """One source of averages per profile, in the order of `sigma_rels`
        (see `keras_swa.optimizers.PowerEMAProfile`)."""
        return tuple(
            PowerEMAProfile(self, index) for index in range(len(self.sigma_rels))
        )

    def _power_profiles(self):
        return list(
            zip(self.sigma_rels, self.gammas, self._profile_averages or [])
        )

    def get_config(self):
        config = super().get_config()
        config["sigma_rels"] = list(self.sigma_rels)
        return config


class PowerEMAProfile(engine.Averager):
    """One profile of a `keras_swa.PostHocEMA`: its averages, as a source.

    Pass it as `source` to `keras_swa.assign_average`,
    `keras_swa.averaged_weights` (and every function that takes a source);
    get it from `PostHocEMA.profiles`.

    Args:
        optimizer: The `keras_swa.PostHocEMA` that keeps the profile.
        index: Integer, the profile's index in `optimizer.sigma_rels`.

    Example:

    >>> narrow, wide = opt.profiles  # doctest: +SKIP
    >>> keras_swa.assign_average(model, source=wide,
    ...                          bn_data=x_train)  # doctest: +SKIP
    """

    log_name = "ema"

    def __init__(self, optimizer: PostHocEMA, index: int):
        self.optimizer = optimizer
        self.index = index

    @property
    def sigma_rel(self) -> float:
        """The relative width of the profile."""
        return self.optimizer.sigma_rels[self.index]

    @property
    def gamma(self) -> float:
        """The exponent of the profile."""
        return self.optimizer.gammas[self.index]

    @property
    def _averages(self):
        averages = self.optimizer._profile_averages
        return None if averages is None else averages[self.index]

    @property
    def _n_averaged(self):
        # Shared by all profiles: they fold in together.
        return self.optimizer.n_averaged

    def _schedule(self):
        return (
            f"(Profile {self.index}, sigma_rel={self.sigma_rel}.) "
            + self.optimizer._schedule()
        )

    def __repr__(self):
        return (
            f"<PowerEMAProfile {self.index} of {self.optimizer.name}: "
            f"sigma_rel={self.sigma_rel}, gamma={self.gamma:.4f}>"
        )
