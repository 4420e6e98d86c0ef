"""`SWA`: the equal-weight mean of the weights, or of the last `window`
snapshots of them, as an optimizer wrapper."""

import keras

from keras_swa import _validation
from keras_swa import averaging
from keras_swa.optimizers import base


@keras.saving.register_keras_serializable(package="keras_swa")
class SWA(base.AveragedOptimizer):
    """Stochastic Weight Averaging (Izmailov et al., 2018) as an optimizer.

    Keeps the equal-weight mean of the weights after updates
    `start_averaging`, `start_averaging + average_period`, ... (the
    `tensorflow_addons.optimizers.SWA` rule, step for step). The model keeps
    training on its own weights; copy the average in when you want it, with
    `keras_swa.assign_average`, `keras_swa.averaged_weights` or
    `assign_average_vars`.

    With `window=k`, the average is the mean of the last `min(n, k)`
    snapshots only (LAWA: Kaddour 2022; Sanyal et al. 2023), computed afresh
    from the `k - 1` snapshots held and the newest at every snapshot, so no
    rounding accumulates however long training runs. `n_averaged` still
    counts every snapshot.

    Memory: one copy of the trainable weights (float32 for float16 and
    bfloat16 weights); with `window=k`, `k` copies.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap.
        start_averaging: Integer >= 0, the first update (0-based) to average.
            Defaults to `0`.
        average_period: Integer >= 1, updates between two snapshots.
            Defaults to `10`.
        window: Integer >= 1, the number of latest snapshots averaged, or
            `None` for all of them. Defaults to `None`.
        skip_non_finite: Boolean, whether a snapshot of weights holding NaN
            or infinity is skipped (see `keras_swa.AveragedOptimizer`).
            Defaults to `False`.
        offload: Boolean, whether the averages (and the window's snapshots)
            live in host memory, off the accelerator (see
            `keras_swa.AveragedOptimizer`). Defaults to `False`.
        name: String. Defaults to `None` (an automatic name).

    Example:

    >>> opt = keras_swa.SWA(keras.optimizers.SGD(0.05, momentum=0.9),
    ...                     start_averaging=1000, average_period=100)
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, epochs=20)  # doctest: +SKIP
    >>> keras_swa.assign_average(model, bn_data=x)  # doctest: +SKIP

    The mean of the last 5 snapshots, kept in host memory:

    >>> opt = keras_swa.SWA(keras.optimizers.AdamW(1e-3), average_period=500,
    ...                     window=5, offload=True)
    """

    log_name = "swa"

    def __init__(
        self,
        inner_optimizer,
        start_averaging=0,
        average_period=10,
        window=None,
        skip_non_finite=False,
        offload=False,
        name=None,
        **kwargs,
    ):
        window = _validation.integer("window", window, 1, optional=True)
        super().__init__(
            inner_optimizer,
            start_averaging=start_averaging,
            average_period=average_period,
            skip_non_finite=skip_non_finite,
            offload=offload,
            name=name,
            **kwargs,
        )
        self.window = window

    def average_weight(self, n_averaged):
        return averaging.swa_weight(n_averaged)

    def averaging_rule(self):
        return averaging.Uniform()

    def get_config(self):
        config = super().get_config()
        config["window"] = self.window
        return config
