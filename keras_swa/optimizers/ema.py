"""`EMA`: an exponential moving average of the weights, as an optimizer
wrapper."""

import keras

from keras_swa import _validation
from keras_swa import averaging
from keras_swa.optimizers import base


@keras.saving.register_keras_serializable(package="keras_swa")
class EMA(base.AveragedOptimizer):
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
        offload: Boolean, whether the average lives in host memory, off the
            accelerator (see `keras_swa.AveragedOptimizer`). Defaults to
            `False`.
        name: String. Defaults to `None` (an automatic name).

    Example:

    >>> opt = keras_swa.EMA(keras.optimizers.AdamW(1e-3), decay=0.999)
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, epochs=20)  # doctest: +SKIP
    >>> with keras_swa.averaged_weights(model):  # doctest: +SKIP
    ...     model.evaluate(x_test, y_test)
    """

    log_name = "ema"

    def __init__(
        self,
        inner_optimizer,
        decay=0.999,
        start_averaging=0,
        average_period=1,
        warmup=False,
        skip_non_finite=False,
        offload=False,
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
            offload=offload,
            name=name,
            **kwargs,
        )
        self.decay = decay
        self.warmup = warmup

    def average_weight(self, n_averaged):
        return averaging.ema_weight(n_averaged, self.decay, self.warmup)

    def averaging_rule(self):
        return averaging.Exponential(self.decay, self.warmup)

    def get_config(self):
        config = super().get_config()
        config.update({"decay": self.decay, "warmup": self.warmup})
        return config
