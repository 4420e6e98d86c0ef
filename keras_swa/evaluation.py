"""Watching and keeping the average of any averager during `fit`.

`EvaluateAverage` logs the validation metrics of the averaged model after
every epoch, where `EarlyStopping`, `ModelCheckpoint`, `TensorBoard` and
`History` see them; `AverageModelCheckpoint` saves the averaged model. Both
work for every averager (the optimizer wrappers and the callbacks), swap the
average in only for as long as they need it, and leave the training weights
and BatchNorm statistics bit for bit as they were.
"""

import contextlib

import keras

from keras_swa import _callback_order
from keras_swa import _data
from keras_swa import _validation
from keras_swa import batch_norm
from keras_swa import schedule_free
from keras_swa import weights


def _unpack_validation_data(data):
    # The forms of `fit(validation_data=...)`: `(x, y)`, `(x, y,
    # sample_weight)`, or a dataset yielding them.
    if isinstance(data, (tuple, list)):
        x, y, sample_weight = (tuple(data) + (None, None))[:3]
        return x, y, sample_weight
    return data, None, None


def check_validation_data(validation_data) -> None:
    """Checks validation data that is evaluated again and again, before
    training: reads no batch.

    Raises:
        ValueError: for a tuple that is not `(x, y[, sample_weight])`, a
            generator or iterator (used up after the first evaluation), or a
            dataset without end (an evaluation would never finish).
    """
    if isinstance(validation_data, (tuple, list)):
        if not 1 <= len(validation_data) <= 3:
            raise ValueError(
                "`validation_data` given as a tuple must be `(x, y)` or "
                "`(x, y, sample_weight)`. Received a tuple of length "
                f"{len(validation_data)}"
            )
        return
    if _data.is_single_use(validation_data):
        raise ValueError(
            "`validation_data` is evaluated after every epoch, but a "
            "generator or iterator is used up after one pass. Pass data that "
            "can be iterated again: arrays `(x, y)`, a `tf.data.Dataset`, a "
            "`keras.utils.PyDataset` or a torch `DataLoader`. Received: "
            f"validation_data={validation_data!r:.200}"
        )
    if _data.is_infinite(validation_data, "validation_data"):
        raise ValueError(
            "`validation_data` has no end (a `tf.data.Dataset` with "
            "`repeat()`, or a `PyDataset` whose `num_batches` is None), so an "
            "evaluation would never finish. Pass a finite dataset, such as "
            "`dataset.take(steps)`. Received: "
            f"validation_data={validation_data!r:.200}"
        )


def evaluate_average(
    model, source, validation_data, bn: batch_norm.BNRecompute, prefix: str
) -> dict:
    """The metrics of the averaged model on `validation_data`.

    Args:
        model: The compiled model.
        source: What holds the averages (see `keras_swa.assign_average`).
        validation_data: As `fit`'s `validation_data`.
        bn: The BatchNorm recompute (a `batch_norm.BNRecompute`; callers
            pass a silent one).
        prefix: String put before every metric name.

    Returns:
        A dict `{prefix + name: value}`; the model's weights and statistics
        are back as they were.
    """
    x, y, sample_weight = _unpack_validation_data(validation_data)
    with weights.swap_in(model, source, bn):
        results = model.evaluate(
            x, y, sample_weight=sample_weight, verbose=0, return_dict=True
        )
    return {f"{prefix}{name}": value for name, value in results.items()}


def _resolve(model, source):
    name = "source"
    if source is None:
        source = model.optimizer
        name = "source (defaulting to model.optimizer)"
    if isinstance(source, keras.optimizers.LossScaleOptimizer):
        source = source.inner_optimizer
    # Keras' ScheduleFreeAdamW holds its average x implicitly.
    source = schedule_free.source_of(source, model)
    return _validation.average_source(name, source)


def _check_source(source):
    """Checks a `source=` argument when the callback is created."""
    if source is None:
        return
    if isinstance(source, keras.optimizers.LossScaleOptimizer):
        source = source.inner_optimizer
    _validation.average_source("source", schedule_free.source_of(source))


def _default_prefix(source) -> str:
    # Each keras_swa averager names its kind: "swa", "ema", "swag".
    return f"val_{getattr(source, 'log_name', 'avg')}_"


def _n_averaged(source) -> int:
    return int(source.n_averaged.numpy())


class EvaluateAverage(keras.callbacks.Callback):
    """Logs the validation metrics of the averaged model after every epoch.

    Once the averager has folded something in, each epoch ends with an
    evaluation of the averaged model (the averages swapped in, BatchNorm
    recomputed on `bn_data` when given, then the training weights and
    statistics put back bit for bit), logged as `<prefix><metric>` in the
    epoch logs: callbacks after this one (`EarlyStopping`, `ModelCheckpoint`,
    `TensorBoard`) and `History` see them. Its cost per epoch is one
    BatchNorm pass over `bn_data` (when given) and one `evaluate`.

    Order in `callbacks`: after an averaging callback it reads (so that it
    sees the average of the epoch that just ended), and before the callbacks
    that monitor what it logs; both are checked when `fit` starts.

    Args:
        validation_data: The data to evaluate on, in the forms `fit`'s
            `validation_data` takes: `(x, y)`, `(x, y, sample_weight)` or a
            dataset.
        source: What holds the averages: an averaging optimizer wrapper, an
            averaging callback, a `keras_swa.ScheduleFree` optimizer or
            Keras' `ScheduleFreeAdamW` (evaluated at x, logged as
            `val_sf_*`), or any object with `n_averaged` and
            `assign_average_vars`. Defaults to `None`: `model.optimizer`
            (looking inside a `LossScaleOptimizer`).
        bn_data: Data to recompute the BatchNorm statistics of the average
            on before each evaluation, or `None` to evaluate with the
            training statistics. Defaults to `None`.
        bn_steps: Integer >= 1, the batches of `bn_data` to use, or `None`
            for all. Defaults to `None`.
        prefix: String before each metric name. Defaults to `None`:
            `"val_swa_"` for SWA (the wrapper and the callbacks), `"val_ema_"`
            for the EMA wrappers, `"val_swag_"` for SWAG, `"val_avg_"`
            otherwise.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32.

    Example:

    >>> model.compile(optimizer=keras_swa.EMA(keras.optimizers.AdamW(1e-3)),
    ...               loss="mse", metrics=["mae"])  # doctest: +SKIP
    >>> model.fit(x, y, epochs=20, callbacks=[
    ...     keras_swa.EvaluateAverage((x_val, y_val)),
    ...     keras.callbacks.EarlyStopping(monitor="val_ema_loss",
    ...                                   patience=3),
    ... ])  # doctest: +SKIP
    """

    def __init__(
        self,
        validation_data,
        source=None,
        bn_data=None,
        bn_steps: int | None = None,
        prefix: str | None = None,
        bn_batch_size: int | None = None,
    ):
        super().__init__()
        if validation_data is None:
            raise ValueError(
                "`validation_data` is required: the data to evaluate the "
                "averaged model on, such as `(x_val, y_val)`."
            )
        check_validation_data(validation_data)
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(
                f"`prefix` must be a string or None. Received: prefix={prefix!r}"
            )
        _check_source(source)
        self.validation_data = validation_data
        self.source = source
        batch_norm.BNRecompute.checked(
            bn_data, bn_steps, bn_batch_size, reused=True
        )
        self.bn_data = bn_data
        self.bn_steps = bn_steps
        self.bn_batch_size = bn_batch_size
        self.prefix = prefix

    def on_train_begin(self, logs=None):
        source = _resolve(self.model, self.source)
        if isinstance(source, keras.callbacks.Callback):
            _callback_order.check_source_comes_first(self, source)
        self._prefix = self.prefix or _default_prefix(source)
        _callback_order.check_metrics_come_first(self, self._prefix)
        _callback_order.check_prefix_is_its_own(self, self._prefix)
        # Monitors of the average have nothing to read before the first
        # snapshot: no "metric not available" warning until then.
        self._quiet = _callback_order.quiet_missing_metrics(
            self, self._prefix
        )

    def on_train_end(self, logs=None):
        self._quiet.close()

    def on_epoch_end(self, epoch, logs=None):
        source = _resolve(self.model, self.source)
        if logs is None or _n_averaged(source) == 0:
            return
        self._quiet.close()
        results = evaluate_average(
            self.model,
            source,
            self.validation_data,
            batch_norm.BNRecompute.of(self),
            self._prefix,
        )
        # A prefix such as "val_" would replace `fit`'s own `val_loss`
        # with the average's, silently.
        taken = sorted(set(results) & set(logs))
        if taken:
            raise ValueError(
                f"EvaluateAverage would overwrite {taken} in the epoch logs, "
                "written by `fit` or a callback before it. Give it another "
                f"`prefix`. Received: prefix={self._prefix!r}"
            )
        logs.update(results)


class AverageModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` that saves the averaged model.

    Whenever `ModelCheckpoint` would save (every epoch, every `save_freq`
    batches, or the best by `monitor`), the averages of `source` are swapped
    in, with the BatchNorm statistics recomputed on `bn_data` when given,
    the model is saved, and the training weights and statistics are put back
    bit for bit: training goes on from where it was. Nothing is saved before
    the averager has folded in a first snapshot. To keep the best average,
    monitor a metric of the average, such as `"val_swa_accuracy"` logged by
    `keras_swa.EvaluateAverage` earlier in `callbacks`.

    Args:
        filepath: As `keras.callbacks.ModelCheckpoint`.
        source: What holds the averages, as in `EvaluateAverage`. Defaults
            to `None`: `model.optimizer`.
        bn_data: Data to recompute the BatchNorm statistics of the average
            on before each save, or `None`. Defaults to `None`.
        bn_steps: Integer >= 1, the batches of `bn_data` to use, or `None`
            for all. Defaults to `None`.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32.
        **kwargs: The other arguments of `keras.callbacks.ModelCheckpoint`
            (`monitor`, `save_best_only`, `save_weights_only`, `mode`,
            `save_freq`, `initial_value_threshold`, `verbose`).

    Example:

    >>> model.fit(train_ds, epochs=40, callbacks=[
    ...     keras_swa.StochasticWeightAveraging(start_epoch=0.75),
    ...     keras_swa.AverageModelCheckpoint(
    ...         "swa/{epoch:03d}.keras", source=swa, bn_data=train_ds),
    ... ])  # doctest: +SKIP
    """

    def __init__(
        self,
        filepath,
        source=None,
        bn_data=None,
        bn_steps: int | None = None,
        bn_batch_size: int | None = None,
        **kwargs,
    ):
        _check_source(source)
        batch_norm.BNRecompute.checked(
            bn_data, bn_steps, bn_batch_size, reused=True
        )
        super().__init__(filepath, **kwargs)
        self.source = source
        self.bn_data = bn_data
        self.bn_steps = bn_steps
        self.bn_batch_size = bn_batch_size
        self._swap = contextlib.ExitStack()

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        source = _resolve(self.model, self.source)
        if isinstance(source, keras.callbacks.Callback):
            _callback_order.check_source_comes_first(self, source)

    # `ModelCheckpoint._save_model` asks `_should_save_model` (which also
    # tracks the best value), then saves: private methods, but the only
    # point between the decision and the save. The average goes in once a
    # save is decided and comes out when `_save_model` returns, so epochs
    # that save nothing cost no BatchNorm pass.
    def _should_save_model(self, epoch, batch, logs, filepath):
        if _n_averaged(_resolve(self.model, self.source)) == 0:
            return False
        should_save = super()._should_save_model(epoch, batch, logs, filepath)
        if should_save:
            self._swap.enter_context(
                weights.swap_in(
                    self.model,
                    _resolve(self.model, self.source),
                    batch_norm.BNRecompute.of(self),
                )
            )
        return should_save

    def _save_model(self, epoch, batch, logs):
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            self._swap.close()
