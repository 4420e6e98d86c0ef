"""The averaging rules, as small pure `keras.ops` functions.

Nothing here knows about optimizers, callbacks or variables: each function
maps tensors to tensors, so the same rule serves the optimizer wrappers (inside
a compiled train step), the epoch-level callback and the tests' references.
"""

import math
from types import MappingProxyType
from typing import Any
from typing import Mapping
from typing import NamedTuple

import keras
import numpy as np
from keras import ops


def _dtype(tensor) -> str:
    return keras.backend.standardize_dtype(tensor.dtype)


def is_snapshot_step(step, start_averaging: int, average_period: int):
    """Whether the weights after update `step` are folded into the average.

    The rule of `tensorflow_addons.optimizers.SWA`: update `step` (0-based)
    is a snapshot when `step >= start_averaging` and
    `(step - start_averaging) % average_period == 0`.

    Args:
        step: Integer scalar tensor, the 0-based index of the update.
        start_averaging: Python int, the first update that is averaged.
        average_period: Python int, the number of updates between snapshots.

    Returns:
        A boolean scalar tensor; a Python bool when `step` is a Python int
        (eager backends test it in Python, without tensor ops).

    Example:

    >>> bool(is_snapshot_step(12, start_averaging=2, average_period=5))
    True
    """
    if isinstance(step, int):
        return step >= start_averaging and (
            (step - start_averaging) % average_period == 0
        )
    step = ops.convert_to_tensor(step)
    offset = ops.subtract(step, ops.cast(start_averaging, step.dtype))
    on_period = ops.equal(
        ops.mod(offset, ops.cast(average_period, step.dtype)), 0
    )
    return ops.logical_and(ops.greater_equal(offset, 0), on_period)


def swa_update(average, value, n_averaged):
    """Folds `value` into the equal-weight running mean of `n_averaged` snapshots.

    `average + (value - average) / (n_averaged + 1)`: with `n_averaged == 0`
    the result is `value` itself, whatever `average` held.

    Args:
        average: Tensor, the mean of the snapshots so far.
        value: Tensor of the same shape, the new snapshot.
        n_averaged: Integer scalar tensor, snapshots in `average`.

    Returns:
        The new average, in the dtype of `average`.

    Example:

    >>> float(swa_update(2.0, 5.0, n_averaged=2))
    3.0
    """
    average = ops.convert_to_tensor(average)
    return interpolate(average, value, swa_weight(n_averaged, _dtype(average)))


def ema_decay(n_averaged, decay: float, warmup: bool, dtype="float32"):
    """The decay used for the next EMA snapshot.

    Args:
        n_averaged: Integer scalar tensor, snapshots folded in so far.
        decay: Python float in [0, 1).
        warmup: If True, `min(decay, (1 + n) / (10 + n))`, which lets early
            snapshots count more (as `tf.train.ExponentialMovingAverage` with
            `num_updates`).
        dtype: The float dtype of the result. Defaults to `"float32"`.

    Returns:
        A scalar tensor of `dtype`.
    """
    decay = ops.convert_to_tensor(decay, dtype=dtype)
    if not warmup:
        return decay
    n = ops.cast(n_averaged, dtype)
    return ops.minimum(decay, ops.divide(ops.add(n, 1.0), ops.add(n, 10.0)))


def ema_update(average, value, n_averaged, decay: float, warmup: bool = False):
    """One exponential-moving-average snapshot.

    The first snapshot (`n_averaged == 0`) copies `value`; later ones give
    `d * average + (1 - d) * value` with `d = ema_decay(n_averaged, ...)`.

    Args:
        average: Tensor, the current moving average.
        value: Tensor of the same shape, the new snapshot.
        n_averaged: Integer scalar tensor, snapshots folded in so far.
        decay: Python float in [0, 1).
        warmup: Whether to ramp the decay up, see `ema_decay`.

    Returns:
        The new average, in the dtype of `average`.

    Example:

    >>> float(ema_update(1.0, 3.0, n_averaged=4, decay=0.5))
    2.0
    """
    average = ops.convert_to_tensor(average)
    return interpolate(
        average, value, ema_weight(n_averaged, decay, warmup, _dtype(average))
    )


def swa_weight(n_averaged, dtype="float32"):
    """The weight `t` of the next snapshot in `swa_update`: `1 / (n + 1)`.

    Args:
        n_averaged: Integer scalar tensor, snapshots folded in so far.
        dtype: The float dtype of the result, that of the average (a float32
            `1/3` would leave a float64 average float32-accurate). Defaults
            to `"float32"`.

    Returns:
        A scalar tensor of `dtype`.
    """
    return ops.divide(
        ops.convert_to_tensor(1.0, dtype),
        ops.cast(ops.add(n_averaged, 1), dtype),
    )


def ema_weight(n_averaged, decay: float, warmup: bool, dtype="float32"):
    """The weight `t` of the next snapshot in `ema_update`: `1 - d`, and
    `1` for the first snapshot (a copy).

    Args:
        n_averaged: Integer scalar tensor, snapshots folded in so far.
        decay: Python float in [0, 1).
        warmup: Whether to ramp the decay up, see `ema_decay`.
        dtype: The float dtype of the result. Defaults to `"float32"`.

    Returns:
        A scalar tensor of `dtype`.
    """
    d = ema_decay(n_averaged, decay, warmup, dtype)
    return ops.where(
        ops.equal(n_averaged, 0),
        ops.convert_to_tensor(1.0, dtype),
        ops.subtract(ops.convert_to_tensor(1.0, dtype), d),
    )


def interpolate(average, value, weight):
    """Folds a snapshot in: `average + weight * (value - average)`.

    Both rules are such interpolations (`swa_weight`, `ema_weight`), which
    eager backends run as one fused pass over all weights.

    Args:
        average: Tensor, the current average.
        value: Tensor of the same shape, the new snapshot.
        weight: Float scalar tensor in [0, 1], the weight of the snapshot.

    Returns:
        The new average, in the dtype of `average`.

    Example:

    >>> float(interpolate(1.0, 3.0, 0.25))
    1.5
    """
    average = ops.convert_to_tensor(average)
    value = ops.cast(value, average.dtype)
    weight = ops.cast(weight, average.dtype)
    return ops.add(average, ops.multiply(weight, ops.subtract(value, average)))


class Snapshot(NamedTuple):
    """What an averaging rule sees of the snapshot it weighs.

    Attributes:
        count: Integer scalar tensor (or Python int), the snapshots folded
            in before this one (`n_averaged`).
        dtype: String, the float dtype in which the rule computes: that of
            the averages (float64 for float64 variables, float32 for float32
            and the float32 averages of float16 and bfloat16 variables).
        step: Integer scalar tensor, the 0-based index of the update the
            snapshot follows (the epoch, for the `fit` callbacks), or `None`
            where the averager does not give one.
        learning_rate: Float scalar tensor, the learning rate of that
            update, or `None` where the averager does not give one.
        state: Dict of the rule's running scalars (`Rule.state`) before this
            snapshot, tensors of `dtype`; empty for rules without state.
    """

    count: Any
    dtype: str = "float32"
    step: Any = None
    learning_rate: Any = None
    state: Mapping = MappingProxyType({})


class Rule:
    """How much a snapshot weighs in its average.

    The engine folds a snapshot `w` in as
    `average <- average + t * (w - average)`, with `t = rule.weight(s)`
    computed from what the rule sees of the snapshot (`Snapshot`: the count,
    the step, the learning rate, the dtype). SWA's mean, the EMA and the
    power-function EMA are such rules; so is schedule-free's learning-rate
    weighting, whose running scalars the rule names in `state` and updates
    in `next_state` (the engine keeps them beside the averages, saved and
    restored with them).

    Example:

    The `k`-th snapshot weighs `k` (a linearly weighted mean):

    >>> class Linear(Rule):
    ...     def weight(self, snapshot):
    ...         n = ops.cast(snapshot.count, snapshot.dtype)
    ...         return 2.0 / (n + 2.0)
    >>> round(float(Linear().weight(Snapshot(count=1))), 4)
    0.6667
    """

    # Names of the float scalars the rule carries from snapshot to snapshot,
    # all 0 before the first one.
    state = ()
    # Whether `weight` reads `snapshot.learning_rate` (the averager then
    # reads the learning rate on every update).
    uses_learning_rate = False

    def weight(self, snapshot: Snapshot):
        """The weight `t` of the snapshot.

        Args:
            snapshot: A `Snapshot`.

        Returns:
            A scalar tensor in `[0, 1]`, in `snapshot.dtype` (other float
            dtypes are cast to it); 1 for the first snapshot (a copy).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define `weight(snapshot)`."
        )

    def next_state(self, snapshot: Snapshot) -> dict:
        """The rule's state after the snapshot: one value per name of
        `state`. Defaults to `{}` (no state)."""
        return {}


class Uniform(Rule):
    """SWA's equal-weight mean: `t = 1 / (n + 1)` (`swa_weight`)."""

    def weight(self, snapshot):
        return swa_weight(snapshot.count, snapshot.dtype)


class Exponential(Rule):
    """The EMA: `t = 1 - d`, a copy first (`ema_weight`).

    Args:
        decay: Python float in [0, 1).
        warmup: Whether the decay ramps up (`ema_decay`). Defaults to `False`.
    """

    def __init__(self, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup

    def weight(self, snapshot):
        return ema_weight(
            snapshot.count, self.decay, self.warmup, snapshot.dtype
        )


class PowerFunction(Rule):
    """The power-function EMA of exponent `gamma` (`power_ema_weight`).

    Args:
        gamma: Python float, the exponent of the profile.
    """

    def __init__(self, gamma: float):
        self.gamma = gamma

    def weight(self, snapshot):
        return power_ema_weight(snapshot.count, self.gamma, snapshot.dtype)


class LearningRateWeighted(Rule):
    """Schedule-free's weighting (Defazio et al. 2024): snapshot `t` weighs
    `lr_max**p`, with `lr_max` the largest learning rate so far.

    `c = lr_max**p / (S + lr_max**p)`, then `S <- S + lr_max**p`: the
    average is the mean of the snapshots weighted by `lr_max**p` at each.
    The first snapshot (or any while every weight so far is 0, as in a
    warmup from 0) is copied.

    Args:
        power: Python float `p`, the `weight_lr_power`. Defaults to `2.0`.
    """

    state = ("lr_max", "total")
    uses_learning_rate = True

    def __init__(self, power: float = 2.0):
        self.power = power

    def _lr_max(self, snapshot):
        return ops.maximum(snapshot.state["lr_max"], snapshot.learning_rate)

    def weight(self, snapshot):
        weight = ops.power(self._lr_max(snapshot), self.power)
        total = ops.add(snapshot.state["total"], weight)
        one = ops.convert_to_tensor(1.0, snapshot.dtype)
        return ops.where(
            ops.greater(total, 0.0),
            ops.divide(weight, ops.maximum(total, 1e-30)),
            one,
        )

    def next_state(self, snapshot):
        lr_max = self._lr_max(snapshot)
        return {
            "lr_max": lr_max,
            "total": ops.add(
                snapshot.state["total"], ops.power(lr_max, self.power)
            ),
        }


class CountRule(Rule):
    """A rule from a function of the count alone, such as
    `AveragedOptimizer.average_weight`: `t = function(n_averaged)`, cast to
    the averages' dtype.

    Args:
        function: Function `n_averaged -> t`.
    """

    def __init__(self, function):
        self.function = function

    def weight(self, snapshot):
        return ops.cast(self.function(snapshot.count), snapshot.dtype)


def as_rule(rule) -> Rule:
    """`rule` if it is a `Rule`, else the function `n_averaged -> t` it is,
    as a `CountRule`."""
    return rule if isinstance(rule, Rule) else CountRule(rule)


# The widest relative standard deviation of a power-function EMA: the paper
# (Karras et al. 2024) bounds `sigma_rel` below 0.28, where `gamma` is still
# positive and the cubic that ties the two has one root on that branch.
MAX_SIGMA_REL = 0.28


def power_ema_weight(n_averaged, gamma: float, dtype="float32"):
    """The weight `t` of the next snapshot of a power-function EMA.

    For the `k`-th snapshot (`k = n_averaged + 1`) the average decays by
    `beta = (1 - 1/k) ** (gamma + 1)` (Karras et al. 2024), so the snapshot
    weighs `t = 1 - beta`; the first snapshot (`k = 1`) weighs 1, a copy.
    After `k` snapshots snapshot `i` weighs `(i/k)**(gamma+1) -
    ((i-1)/k)**(gamma+1)`: the profile `(gamma + 1) * tau**gamma / k**(gamma+1)`
    integrated over `(i - 1, i]`.

    `t` is computed as `-expm1((gamma + 1) * log1p(-1/k))`: `1 - beta` in
    float32 would lose all digits of `t` (about `(gamma + 1) / k`) once `k`
    reaches the millions.

    Args:
        n_averaged: Integer scalar tensor, snapshots folded in so far.
        gamma: Python float, the exponent of the profile (see
            `sigma_rel_to_gamma`).
        dtype: The float dtype of the result. Defaults to `"float32"`.

    Returns:
        A scalar tensor of `dtype`.

    Example:

    >>> round(float(power_ema_weight(1, gamma=1.0)), 6)  # 1 - (1/2)**2
    0.75
    """
    k = ops.cast(ops.add(n_averaged, 1), dtype)
    one = ops.convert_to_tensor(1.0, dtype)
    t = ops.negative(
        ops.expm1(ops.multiply(
            ops.convert_to_tensor(gamma + 1.0, dtype),
            ops.log1p(ops.negative(ops.divide(one, k))),
        ))
    )
    return ops.where(ops.equal(n_averaged, 0), one, t)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function EMA profile
    of exponent `gamma`.

    `sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 * (gamma + 3)))`: the
    standard deviation of the profile `tau**gamma` on `[0, t]` divided by `t`.

    Args:
        gamma: Python float > -1.

    Returns:
        A Python float.

    Example:

    >>> round(gamma_to_sigma_rel(6.9372), 4)
    0.1
    """
    gamma = float(gamma)
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power-function EMA of relative width `sigma_rel`.

    Inverts `gamma_to_sigma_rel` on its decreasing branch (`gamma > 0`):
    squared and multiplied out, it is the cubic
    `gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s) = 0` with
    `s = sigma_rel**-2` (Karras et al. 2024, Algorithm 2), whose largest real
    root is the one wanted.

    Args:
        sigma_rel: Python float in `(0, MAX_SIGMA_REL)`.

    Returns:
        A Python float.

    Example:

    >>> round(sigma_rel_to_gamma(0.1), 4)
    6.9372
    """
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.isreal(roots)].real.max())
