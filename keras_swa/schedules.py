"""The SWA learning-rate schedule for the step-level path."""

import math
import numbers

import keras
from keras import ops

from keras_swa import _validation

ANNEAL_STRATEGIES = ("cos", "linear")
_Schedule = keras.optimizers.schedules.LearningRateSchedule


def check_anneal_strategy(anneal_strategy):
    """Raises a `ValueError` unless `anneal_strategy` is "cos" or "linear"."""
    if not isinstance(anneal_strategy, str) or (
        anneal_strategy not in ANNEAL_STRATEGIES
    ):
        raise ValueError(
            '`anneal_strategy` must be one of "cos", "linear". '
            f"Received: anneal_strategy={anneal_strategy!r}"
        )


def anneal_weight(t, anneal_strategy):
    """The weight of the SWA learning rate at annealing progress `t`.

    `torch.optim.swa_utils.SWALR`'s rule: `t` for "linear",
    `(1 - cos(pi * t)) / 2` for "cos"; the annealed rate is
    `swa_lr * alpha + lr0 * (1 - alpha)`.

    Args:
        t: Float scalar tensor in [0, 1].
        anneal_strategy: "cos" or "linear".

    Returns:
        `alpha`, a float scalar tensor.
    """
    t = ops.convert_to_tensor(t)
    if anneal_strategy == "linear":
        return t
    return ops.divide(ops.subtract(1.0, ops.cos(ops.multiply(math.pi, t))), 2.0)


@keras.saving.register_keras_serializable(package="keras_swa")
class SWALearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate of an SWA run: `base`, then an SWA phase.

    Until step `swa_start` the rate is `base` (a float, or a schedule
    evaluated at the step). From `swa_start` on, with `lr0 = base(swa_start)`
    and `k = step - swa_start`:

    - Constant SWA phase (`cycle_length=None`, the default): the rate goes
      from `lr0` to `swa_lr` over `anneal_steps` steps, as
      `torch.optim.swa_utils.SWALR` does over epochs:
      `swa_lr * alpha + lr0 * (1 - alpha)` with
      `alpha = anneal(min(1, k / anneal_steps))`, where `anneal(t)` is `t`
      for "linear" and `(1 - cos(pi * t)) / 2` for "cos". So step
      `swa_start` gives `lr0` and step `swa_start + anneal_steps` (and every
      later step) gives `swa_lr`; with `anneal_steps=0` every step from
      `swa_start` on gives `swa_lr`.
    - Cyclical SWA phase (`cycle_length=c`, Izmailov et al., 2018): the
      rate falls linearly within each cycle of `c` steps, from `lr0` at the
      first step of the cycle to `swa_lr` at its last step,
      `swa_lr * alpha + lr0 * (1 - alpha)` with `alpha = (k mod c) / (c - 1)`;
      with `c = 1` every step
      gives `swa_lr`. (The paper's `t(i) = (mod(i - 1, c) + 1) / c` starts a
      cycle one `1/c` below `lr0`; here a cycle starts at `lr0` itself and
      ends at `swa_lr` exactly.) Average the weights at the cycle ends,
      where the rate is lowest, with
      `keras_swa.SWA(inner, start_averaging=swa_start + c - 1,
      average_period=c)`.

    The step is the one Keras evaluates a schedule at: the optimizer's
    update count, or with `gradient_accumulation_steps=A` on the optimizer,
    its micro-step count (`A` per update; the update `u` is evaluated at
    micro-step `u * A + A - 1`). `base` gets that step as Keras gives it.
    The SWA phase counts real updates, as `keras_swa.SWA`'s snapshots do:
    give the schedule the optimizer's `gradient_accumulation_steps` too, and
    `swa_start`, `anneal_steps` and `cycle_length` are updates (the update
    `u` is `step // A`, and `lr0` is the rate `base` gives the update
    `swa_start`, at micro-step `swa_start * A + A - 1`).

    Args:
        base: Float >= 0 or a `keras.optimizers.schedules.LearningRateSchedule`,
            the learning rate before the SWA phase.
        swa_start: Integer >= 0, the first step of the SWA phase.
        swa_lr: Float >= 0, the SWA learning rate.
        anneal_steps: Integer >= 0, the steps from `lr0` to `swa_lr` in the
            constant phase. Must be `0` with `cycle_length`, whose cycles
            already run from `lr0` to `swa_lr`. Defaults to `0`.
        anneal_strategy: "cos" or "linear", the shape of the annealing.
            Defaults to `"cos"`.
        cycle_length: `None` for the constant phase, or an integer >= 1,
            the steps in one cycle of the cyclical phase. Defaults to `None`.
        gradient_accumulation_steps: `None`, or the optimizer's
            `gradient_accumulation_steps` (an integer >= 1), so that the SWA
            phase counts real updates, not micro-steps. Defaults to `None`.

    Example:

    Constant SWA phase after 3000 steps of cosine decay, as in
    `torch.optim.swa_utils.SWALR`:

    >>> import keras_swa
    >>> lr = keras_swa.SWALearningRate(
    ...     base=keras.optimizers.schedules.CosineDecay(0.1, 3000),
    ...     swa_start=3000, swa_lr=0.01, anneal_steps=500)
    >>> optimizer = keras_swa.SWA(keras.optimizers.SGD(lr, momentum=0.9),
    ...                           start_averaging=3000, average_period=100)

    The paper's cyclical schedule, averaging at the end of each cycle:

    >>> lr = keras_swa.SWALearningRate(
    ...     base=0.05, swa_start=3000, swa_lr=0.001, cycle_length=400)
    >>> optimizer = keras_swa.SWA(keras.optimizers.SGD(lr),
    ...                           start_averaging=3000 + 400 - 1,
    ...                           average_period=400)

    With gradient accumulation, the phase still begins at update 3000:

    >>> lr = keras_swa.SWALearningRate(
    ...     base=0.05, swa_start=3000, swa_lr=0.001,
    ...     gradient_accumulation_steps=4)
    >>> optimizer = keras_swa.SWA(
    ...     keras.optimizers.SGD(lr, gradient_accumulation_steps=4),
    ...     start_averaging=3000, average_period=100)
    """

    def __init__(
        self,
        base,
        swa_start,
        swa_lr,
        anneal_steps=0,
        anneal_strategy="cos",
        cycle_length=None,
        gradient_accumulation_steps=None,
    ):
        super().__init__()
        if not isinstance(base, _Schedule):
            if isinstance(base, bool) or not isinstance(base, numbers.Real):
                raise TypeError(
                    "`base` must be a float >= 0 or a "
                    "`keras.optimizers.schedules.LearningRateSchedule`. "
                    f"Received: base={base!r} of type {type(base).__name__}"
                )
            base = _validation.real("base", base, minimum=0.0)
        swa_start = _validation.integer("swa_start", swa_start, 0)
        swa_lr = _validation.real("swa_lr", swa_lr, minimum=0.0)
        anneal_steps = _validation.integer("anneal_steps", anneal_steps, 0)
        check_anneal_strategy(anneal_strategy)
        cycle_length = _validation.integer(
            "cycle_length", cycle_length, 1, optional=True
        )
        gradient_accumulation_steps = _validation.integer(
            "gradient_accumulation_steps", gradient_accumulation_steps, 1,
            optional=True,
        )
        if cycle_length is not None:
            if anneal_steps:
                raise ValueError(
                    "`anneal_steps` must be 0 when `cycle_length` is set: "
                    "each cycle already runs from the base learning rate to "
                    f"`swa_lr`. Received: anneal_steps={anneal_steps}, "
                    f"cycle_length={cycle_length}"
                )
        self.base = base
        self.swa_start = swa_start
        self.swa_lr = swa_lr
        self.anneal_steps = anneal_steps
        self.anneal_strategy = anneal_strategy
        self.cycle_length = cycle_length
        self.gradient_accumulation_steps = gradient_accumulation_steps

    def _base_value(self, step):
        if isinstance(self.base, _Schedule):
            return ops.convert_to_tensor(self.base(step))
        return ops.convert_to_tensor(self.base)

    def __call__(self, step):
        step = ops.convert_to_tensor(step)
        base = self._base_value(step)
        dtype = base.dtype
        accumulation = self.gradient_accumulation_steps or 1
        # The micro-step where Keras evaluates the rate of update
        # `swa_start` (the update itself without accumulation).
        first = self.swa_start * accumulation + accumulation - 1
        lr0 = ops.cast(self._base_value(ops.cast(first, step.dtype)), dtype)
        update = step
        if accumulation > 1:
            update = ops.floor_divide(step, accumulation)
        # Integer arithmetic for the offset keeps `k mod c` exact at large
        # step counts, where a float32 step would round.
        k = ops.subtract(update, ops.cast(self.swa_start, step.dtype))
        alpha = ops.cast(self._swa_weight(k), dtype)
        # In this form `alpha == 1` gives `swa_lr` exactly, not up to a
        # float32 rounding of `lr0 + (swa_lr - lr0)`.
        swa_phase = ops.add(
            ops.multiply(ops.cast(self.swa_lr, dtype), alpha),
            ops.multiply(lr0, ops.subtract(1.0, alpha)),
        )
        return ops.where(ops.less(k, 0), base, swa_phase)

    def _swa_weight(self, k):
        """The weight of `swa_lr` `k` steps into the SWA phase."""
        if self.cycle_length is None:
            if self.anneal_steps == 0:
                return ops.ones(())
            t = ops.clip(
                ops.divide(ops.cast(k, "float32"), float(self.anneal_steps)),
                0.0,
                1.0,
            )
            return anneal_weight(t, self.anneal_strategy)
        if self.cycle_length == 1:
            return ops.ones(())
        position = ops.cast(ops.mod(k, self.cycle_length), "float32")
        return ops.divide(position, float(self.cycle_length - 1))

    def get_config(self):
        base = self.base
        if isinstance(base, _Schedule):
            base = keras.saving.serialize_keras_object(base)
        return {
            "base": base,
            "swa_start": self.swa_start,
            "swa_lr": self.swa_lr,
            "anneal_steps": self.anneal_steps,
            "anneal_strategy": self.anneal_strategy,
            "cycle_length": self.cycle_length,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["base"], dict):
            config["base"] = keras.saving.deserialize_keras_object(
                config["base"]
            )
        return cls(**config)
