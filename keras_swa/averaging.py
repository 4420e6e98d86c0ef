"""The averaging rules, as small pure `keras.ops` functions.

Nothing here knows about optimizers, callbacks or variables: each function
maps tensors to tensors, so the same rule serves the optimizer wrappers (inside
a compiled train step), the epoch-level callback and the tests' references.
"""

import math

import numpy as np
from keras import ops


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
    return interpolate(average, value, swa_weight(n_averaged))


def ema_decay(n_averaged, decay: float, warmup: bool):
    """The decay used for the next EMA snapshot.

    Args:
        n_averaged: Integer scalar tensor, snapshots folded in so far.
        decay: Python float in [0, 1).
        warmup: If True, `min(decay, (1 + n) / (10 + n))`, which lets early
            snapshots count more (as `tf.train.ExponentialMovingAverage` with
            `num_updates`).

    Returns:
        A float32 scalar tensor.
    """
    decay = ops.convert_to_tensor(decay, dtype="float32")
    if not warmup:
        return decay
    n = ops.cast(n_averaged, "float32")
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
    return interpolate(
        average, value, ema_weight(n_averaged, decay, warmup)
    )


def swa_weight(n_averaged):
    """The weight `t` of the next snapshot in `swa_update`: `1 / (n + 1)`.

    Args:
        n_averaged: Integer scalar tensor, snapshots folded in so far.

    Returns:
        A float32 scalar tensor.
    """
    return ops.divide(1.0, ops.cast(ops.add(n_averaged, 1), "float32"))


def ema_weight(n_averaged, decay: float, warmup: bool):
    """The weight `t` of the next snapshot in `ema_update`: `1 - d`, and
    `1` for the first snapshot (a copy).

    Args:
        n_averaged: Integer scalar tensor, snapshots folded in so far.
        decay: Python float in [0, 1).
        warmup: Whether to ramp the decay up, see `ema_decay`.

    Returns:
        A float32 scalar tensor.
    """
    d = ema_decay(n_averaged, decay, warmup)
    return ops.where(ops.equal(n_averaged, 0), 1.0, ops.subtract(1.0, d))


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


# The widest relative standard deviation of a power-function EMA: the paper
# (Karras et al. 2024) bounds `sigma_rel` below 0.28, where `gamma` is still
# positive and the cubic that ties the two has one root on that branch.
MAX_SIGMA_REL = 0.28


def power_ema_weight(n_averaged, gamma: float):
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

    Returns:
        A float32 scalar tensor.

    Example:

    >>> round(float(power_ema_weight(1, gamma=1.0)), 6)  # 1 - (1/2)**2
    0.75
    """
    k = ops.cast(ops.add(n_averaged, 1), "float32")
    t = ops.negative(
        ops.expm1(ops.multiply(gamma + 1.0, ops.log1p(ops.negative(
            ops.divide(1.0, k)
        ))))
    )
    return ops.where(ops.equal(n_averaged, 0), 1.0, t)


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
