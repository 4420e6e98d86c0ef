"""The power-function EMA of Karras et al. (2024) as optimizer wrappers:
`PowerEMA` (one profile) and `PostHocEMA` (several, to choose the EMA after
training), with `PowerEMAProfile`, one profile of a `PostHocEMA` as a source
of averages."""

import keras

from keras_swa import _validation
from keras_swa import averaging
from keras_swa import engine
from keras_swa.optimizers import base


# The smallest exponent: that of the widest profile, `MAX_SIGMA_REL`.
_MIN_GAMMA = averaging.sigma_rel_to_gamma(averaging.MAX_SIGMA_REL)


def check_sigma_rel(name, value):
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
        sigma_rel = check_sigma_rel("sigma_rel", sigma_rel)
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
class PowerEMA(base.AveragedOptimizer):
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
        offload: Boolean, whether the average lives in host memory, off the
            accelerator (see `keras_swa.AveragedOptimizer`). Defaults to
            `False`.
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
        offload=False,
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
            offload=offload,
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
class PostHocEMA(base.AveragedOptimizer):
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
        offload: Boolean, whether the profiles' averages live in host
            memory, off the accelerator (see `keras_swa.AveragedOptimizer`).
            Defaults to `False`.
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
        offload=False,
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
            check_sigma_rel("sigma_rels", sigma_rel) for sigma_rel in sigma_rels
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
            offload=offload,
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
            self._new_averages(
                var_list,
                excluded,
                averaging.PowerFunction(self.gammas[index]),
                name=f"average_{index}",
            )
            for index in range(1, len(self.sigma_rels))
        ]

    def _add_snapshot(self, snapshot, step, learning_rate):
        engine.add_snapshot_together(
            self._profile_averages, snapshot, self.skip_non_finite, step
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

    @property
    def log_name(self) -> str:
        """`ema_<sigma_rel>`: each profile logs under its own name in
        `keras_swa.EvaluateAverage` (`val_ema_0.05_loss`)."""
        return f"ema_{self.sigma_rel:g}"

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
