"""Swaps averaged weights into a model, for good or for the span of a block.

A source of averages is anything with `n_averaged` (a scalar integer
variable) and `assign_average_vars(var_list)`: the optimizer wrappers `SWA`
and `EMA`, and the `StochasticWeightAveraging` callback. It gets
`model.variables` and writes the averages into the variables they were taken
from, wherever their `trainable` stands now. Every write goes through one
`keras_swa.swap.Swap`.
"""

import contextlib

import keras

from keras_swa import _validation
from keras_swa import batch_norm
from keras_swa import engine
from keras_swa import schedule_free
from keras_swa import swap
from keras_swa._backend import distribute


def _resolve_source(model, source):
    _validation.model("model", model)
    # Copying averages into a model of another strategy's scope fails deep
    # in TensorFlow; say what is wrong instead.
    distribute.check_distribution(model.variables)
    where = "`source`"
    if source is None:
        where = "`model.optimizer` (the default `source`)"
        source = getattr(model, "optimizer", None)
    # With mixed precision, `compile` wraps the optimizer in a
    # LossScaleOptimizer; the averages live in the wrapper inside it.
    if isinstance(source, keras.optimizers.LossScaleOptimizer):
        source = source.inner_optimizer
    # Keras' ScheduleFreeAdamW holds its average x implicitly.
    source = schedule_free.source_of(source, model)
    if not hasattr(source, "n_averaged") or not callable(
        getattr(source, "assign_average_vars", None)
    ):
        raise TypeError(
            "`source` must hold averaged weights: a `keras_swa.SWA` or "
            "`keras_swa.EMA` optimizer (optionally inside a "
            "LossScaleOptimizer), a `keras_swa.StochasticWeightAveraging` "
            "callback, or any object with `n_averaged` and "
            "`assign_average_vars(var_list)`. It defaults to "
            "`model.optimizer`. Received: "
            f"source={source!r:.200} of type {type(source).__name__}"
        )
    # `Variable.numpy()`: `ops.convert_to_numpy` of a TensorFlow variable
    # warns under NumPy 2.
    if int(source.n_averaged.numpy()) == 0:
        # keras_swa's averagers say when they average and how far training
        # got; any other source at least gets its name.
        schedule = getattr(source, "_schedule", None)
        raise ValueError(
            f"{where}, {type(source).__name__}, has averaged no weights yet "
            "(n_averaged=0), so there is nothing to assign; the model is "
            "unchanged. "
            + (schedule() if callable(schedule) else
               "Train past the start of averaging first.")
        )
    return source


def written_variables(model, source, bn) -> list:
    """The variables of `model` that assigning the averages of `source`
    (and the BatchNorm recompute `bn`) writes: what a swap records.

    For a keras_swa averager, the model's variables it holds averages of,
    `trainable` or not now; for any other source, which may write any
    variable it is given, all of `model.variables`. With data in `bn`, also
    the statistics `update_bn` recomputes.

    Args:
        model: A built `keras.Model`.
        source: A source of averages, as `_resolve_source` returns it.
        bn: A `batch_norm.BNRecompute`.

    Returns:
        A list of `keras.Variable`s.
    """
    averages = getattr(source, "_averages", None)
    if (
        isinstance(source, engine.Averager)
        and averages is not None
        # A subclass that assigns otherwise may write other variables.
        and type(source).assign_average_vars
        is engine.Averager.assign_average_vars
    ):
        held = {id(variable) for variable in model.variables}
        written = [
            variable
            for variable, average in zip(
                averages.variables, averages.averages
            )
            if average is not None and id(variable) in held
        ]
    else:
        written = list(model.variables)
    return written + bn.variables(model)


def swap_in(model, source, bn) -> swap.Swap:
    """Swaps the averages of `source` in; returns the swap that takes them
    out.

    What `assign_average` and `averaged_weights` do, for callers that swap
    the average in at one point and out at another (a checkpoint callback
    between deciding to save and saving): the averages go into the
    variables they were taken from, the statistics are recomputed as `bn`
    says, and the returned `swap.Swap` holds every variable written. Call
    its `restore()` to put the model back, or `keep()` to keep the average.
    If anything fails here, the model is put back first.

    Args:
        model, source: As in `assign_average`.
        bn: A `batch_norm.BNRecompute`, checked.

    Returns:
        A `swap.Swap`, open.

    Example:

    >>> bn = batch_norm.BNRecompute.checked(x, None, None)  # doctest: +SKIP
    >>> swapped = swap_in(model, source, bn)  # doctest: +SKIP
    >>> try:
    ...     model.save("average.keras")  # doctest: +SKIP
    ... finally:
    ...     swapped.restore()  # doctest: +SKIP
    """
    source = _resolve_source(model, source)
    swapped = swap.Swap(written_variables(model, source, bn))
    try:
        # All variables, not only the trainable ones: the averages go into
        # the variables they were taken from, also when a layer (or the
        # model) was frozen after training.
        source.assign_average_vars(model.variables)
        bn.run(model)
    except BaseException:
        swapped.restore()
        raise
    return swapped


def assign_average(
    model,
    source=None,
    bn_data=None,
    bn_steps: int | None = None,
    verbose="auto",
    bn_batch_size: int | None = None,
) -> None:
    """Copies averaged weights into the model, for good.

    The averages of `source` replace the weights they were taken from,
    whatever their `trainable` is now (a layer or model frozen after
    training gets its averages too); with `bn_data`, the BatchNormalization
    statistics are then recomputed for the averaged weights with
    `keras_swa.update_bn`. If anything fails, every variable written comes
    back bit for bit. Returns `None`, as Keras' `set_weights`: the model
    changes in place.

    Args:
        model: A built `keras.Model`.
        source: What holds the averages: a keras_swa optimizer wrapper
            (`SWA`, `EMA`, `PowerEMA`, a `PostHocEMA` profile), a
            `keras_swa.StochasticWeightAveraging` or `SWAG` callback, a
            `keras_swa.ScheduleFree` optimizer or Keras'
            `keras.optimizers.ScheduleFreeAdamW` (their average x), or any
            object with `n_averaged` and `assign_average_vars(var_list)`
            (called with `model.variables`: it writes those it holds
            averages of). Defaults to `None`: `model.optimizer`, looking
            inside a `keras.optimizers.LossScaleOptimizer`.
        bn_data: Data to recompute the BatchNormalization statistics on, as
            `data` of `keras_swa.update_bn` (typically the training data).
            Defaults to `None`: the statistics are left as they are.
        bn_steps: Integer, the number of batches of `bn_data` to use at most.
            Defaults to `None`, all of them.
        verbose: The progress bar of the BatchNorm pass, as in
            `keras_swa.update_bn`. Defaults to `"auto"`.
        bn_batch_size: Integer, the batch size when `bn_data` is arrays (as
            `batch_size` of `keras_swa.update_bn`). Defaults to `None`: 32.

    Raises:
        TypeError: if `source` holds no averages.
        ValueError: if nothing has been averaged yet, or `update_bn` rejects
            `bn_data` (empty, say); the model is unchanged.

    Example:

    >>> model.compile(optimizer=keras_swa.SWA(keras.optimizers.SGD(0.1)),
    ...               loss="mse")  # doctest: +SKIP
    >>> model.fit(train_ds, epochs=10)  # doctest: +SKIP
    >>> keras_swa.assign_average(model, bn_data=train_ds)  # doctest: +SKIP
    >>> model.save("swa_model.keras")  # doctest: +SKIP
    """
    # The source's errors come before those of the BatchNorm arguments.
    source = _resolve_source(model, source)
    bn = batch_norm.BNRecompute.checked(
        bn_data, bn_steps, bn_batch_size, verbose
    )
    swap_in(model, source, bn).keep()


@contextlib.contextmanager
def averaged_weights(
    model,
    source=None,
    bn_data=None,
    bn_steps: int | None = None,
    verbose="auto",
    bn_batch_size: int | None = None,
):
    """Context manager that runs its block with the averaged weights.

    On entry, the averages of `source` replace the weights they were taken
    from, frozen since or not (and with `bn_data` the BatchNormalization
    statistics are recomputed, as in `keras_swa.assign_average`). On exit,
    also when the block raises, every variable written (the raw weights and
    statistics) comes back bit for bit, so training can go on where it was.
    The context manager yields nothing.

    Args:
        model: A built `keras.Model`.
        source: What holds the averages, as in `keras_swa.assign_average`.
            Defaults to `None`: `model.optimizer`, looking inside a
            `keras.optimizers.LossScaleOptimizer`.
        bn_data: Data to recompute the BatchNormalization statistics on, as
            `data` of `keras_swa.update_bn`. Defaults to `None`: the
            statistics are left as they are.
        bn_steps: Integer, the number of batches of `bn_data` to use at most.
            Defaults to `None`, all of them.
        verbose: The progress bar of the BatchNorm pass, as in
            `keras_swa.update_bn`. Defaults to `"auto"`.
        bn_batch_size: Integer, the batch size when `bn_data` is arrays (as
            `batch_size` of `keras_swa.update_bn`). Defaults to `None`: 32.

    Raises:
        TypeError: if `source` holds no averages.
        ValueError: if nothing has been averaged yet, or `update_bn` rejects
            `bn_data`; the model is unchanged.

    Example:

    >>> model.compile(optimizer=keras_swa.EMA(keras.optimizers.AdamW(1e-3)),
    ...               loss="mse", metrics=["mae"])  # doctest: +SKIP
    >>> model.fit(train_ds, epochs=10)  # doctest: +SKIP
    >>> with keras_swa.averaged_weights(model, bn_data=train_ds):
    ...     model.evaluate(test_ds)  # doctest: +SKIP
    """
    # The source's errors come before those of the BatchNorm arguments.
    source = _resolve_source(model, source)
    bn = batch_norm.BNRecompute.checked(
        bn_data, bn_steps, bn_batch_size, verbose
    )
    with swap_in(model, source, bn):
        yield
