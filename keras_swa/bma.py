"""Bayesian model averaging with SWAG: weights sampled from the posterior,
and the mean of the predictions of many samples."""

import contextlib
import warnings

import keras
import numpy as np
from keras import ops

from keras_swa import _data
from keras_swa import _validation
from keras_swa import batch_norm
from keras_swa import swag as swag_lib
from keras_swa import swap
from keras_swa import weights
from keras_swa._backend import distribute


def _name(variable):
    return getattr(variable, "path", None) or variable.name


def _check_model_and_swag(model, swag, name):
    _validation.model("model", model)
    if not isinstance(swag, swag_lib.SWAG):
        raise TypeError(
            f"`{name}` must be a `keras_swa.SWAG` callback that ran in a "
            f"`fit` of `model`. Received: {name}={swag!r:.200} of type "
            f"{type(swag).__name__}"
        )
    swag._check_sampled()
    # Copying a sample into a model of another strategy's scope fails deep
    # in TensorFlow; say what is wrong instead.
    distribute.check_distribution(model.variables)
    held = {id(variable) for variable in model.variables}
    missing = [
        variable
        for variable in swag._averages.variables
        if id(variable) not in held
    ]
    if missing:
        raise ValueError(
            f"`{name}` holds the posterior of another model: the variable "
            f"{_name(missing[0])!r} it sampled is not in `model`. Pass "
            "the model that was trained with the SWAG callback."
        )


def _assign_sample(model, swag, scale, seed, bn):
    # Into the variables the moments were taken from, by identity: also
    # those of a layer (or model) frozen after training.
    values = swag._sample_values(scale, seed, diagonal=False)
    for variable, value in zip(swag._averages.variables, values):
        variable.assign(ops.cast(value, variable.dtype))
    bn.run(model)


@contextlib.contextmanager
def sampled_weights(
    model,
    swag,
    scale: float = 0.5,
    seed: int | None = 0,
    bn_data=None,
    bn_steps: int | None = None,
    bn_batch_size: int | None = None,
):
    """Context manager that runs its block with weights sampled from SWAG.

    On entry, a sample of `swag.sample(scale, seed)` replaces the weights
    SWAG averaged, frozen since or not (and with `bn_data` the
    BatchNormalization statistics are recomputed for it, silently). On exit,
    also when the block raises, every variable written (the weights and
    statistics the model held) comes back bit for bit. The context manager
    yields nothing.

    Args:
        model: The built `keras.Model` trained with `swag`.
        swag: A `keras_swa.SWAG` callback that has folded in a snapshot.
        scale: Float >= 0, the factor of the posterior covariance; `0` gives
            the SWA mean. Defaults to `0.5`.
        seed: Integer >= 0, or `None` for a fresh sample; the same seed
            gives the same weights (on one backend). Defaults to `0`.
        bn_data: Data to recompute the BatchNormalization statistics on, as
            `data` of `keras_swa.update_bn` (typically the training data).
            Defaults to `None`: the statistics are left as they are.
        bn_steps: Integer >= 1, the batches of `bn_data` to use at most.
            Defaults to `None`, all of them.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32.

    Raises:
        TypeError: if `swag` is not a `SWAG` callback.
        ValueError: if `swag` has no snapshot, holds another model's
            posterior, or an argument is out of range; the model is
            unchanged.

    Example:

    >>> swag = keras_swa.SWAG(start_epoch=0.5)  # doctest: +SKIP
    >>> model.fit(train_ds, epochs=20, callbacks=[swag])  # doctest: +SKIP
    >>> with keras_swa.sampled_weights(model, swag, seed=3,
    ...                                bn_data=train_ds):
    ...     model.evaluate(test_ds)  # one posterior sample  # doctest: +SKIP
    """
    _check_model_and_swag(model, swag, "swag")
    scale, seed, _ = swag_lib.check_sample_arguments(scale, seed)
    bn = batch_norm.BNRecompute.checked(
        bn_data, bn_steps, bn_batch_size, verbose=0
    )
    # A sample goes where the averages would: the same variables.
    with swap.Swap(weights.written_variables(model, swag, bn)):
        _assign_sample(model, swag, scale, seed, bn)
        yield


def _as_tuple(batch):
    # `model.predict` takes from a generator `(x,)`, `(x, y)` or
    # `(x, y, sample_weight)` only; a bare `x` becomes `(x,)`.
    return batch if isinstance(batch, tuple) else (batch,)


def _reader(x):
    """A function that gives `x` as `model.predict` reads it, once a call,
    and the number of batches to read (`None`: all).

    A generator or iterator can be read once, and `model.predict` takes no
    other iterator than a generator: its batches are read here, before any
    weight is swapped, and each call gets a new generator over them. The
    number of batches is then known, and passed on: `model.predict` gives no
    warning that its input "ran out of data".
    """
    if not _data.is_single_use(x):
        return lambda: x, None
    batches = [_as_tuple(batch) for batch in x]
    if not batches:
        raise ValueError(
            "`x` yielded no batch (an exhausted generator or iterator, say), "
            "so there is nothing to predict; the model is unchanged. "
            f"Received: x={x!r:.200}"
        )
    return (lambda: (batch for batch in batches)), len(batches)


def _add(total, probabilities):
    if total is None:
        return probabilities
    return keras.tree.map_structure(np.add, total, probabilities)


def _probabilities(output, from_logits):
    output = np.asarray(output, dtype="float64")
    if not from_logits:
        return output
    if output.ndim == 1 or output.shape[-1] == 1:
        # The sigmoid, without overflow for large negative logits.
        return 0.5 * (1.0 + np.tanh(0.5 * output))
    shifted = output - output.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def _check_arguments(
    model, x, source, num_samples, scale, seed, bn_data, bn_steps,
    batch_size, from_logits, bn_batch_size,
):
    """`predict_bma`'s checks; the arguments it uses, as it uses them (the
    BatchNorm ones as a `batch_norm.BNRecompute`)."""
    _check_model_and_swag(model, source, "source")
    num_samples = _validation.integer("num_samples", num_samples, 1)
    scale, seed, _ = swag_lib.check_sample_arguments(scale, seed)
    bn = batch_norm.BNRecompute.checked(
        bn_data, bn_steps, bn_batch_size, verbose=0, reused=num_samples > 1
    )
    batch_size = _validation.integer("batch_size", batch_size, 1, optional=True)
    from_logits = _validation.boolean("from_logits", from_logits)
    if batch_size is not None and _data.is_single_use(x):
        raise ValueError(
            "`batch_size` applies to arrays only: a generator or iterator "
            "`x` comes in batches already. Remove `batch_size`. Received: "
            f"batch_size={batch_size}, x of type {type(x).__name__}"
        )
    if scale == 0.0:
        # Every sample is the mean.
        num_samples = 1
    elif bn.data is None and batch_norm.statistics_variables(model):
        warnings.warn(
            "The model has BatchNormalization layers, and their statistics "
            "belong to the weights it holds, not to the samples: pass "
            "`bn_data` (such as the training data, with a small `bn_steps`) "
            "to recompute them for each sample.",
            stacklevel=3,
        )
    return num_samples, scale, seed, bn, batch_size, from_logits


def predict_bma(
    model,
    x,
    source,
    num_samples: int = 30,
    scale: float = 0.5,
    seed: int | None = 0,
    bn_data=None,
    bn_steps: int | None = None,
    batch_size: int | None = None,
    from_logits: bool = False,
    bn_batch_size: int | None = None,
):
    """Bayesian model averaging: the mean predictive probabilities over SWAG
    samples.

    For each of `num_samples` samples of the SWAG posterior (sample `k` is
    that of `keras_swa.sampled_weights(model, source, scale, seed + k)`),
    the sample goes into the model, the BatchNormalization statistics are
    recomputed on `bn_data` when given (`keras_swa.update_bn`, one compiled
    training-mode pass over `bn_steps` batches: the dominant cost of a
    sample with BatchNorm, so keep `bn_steps` small, such as 50), and
    `model.predict(x)` runs. The probabilities are averaged; the model's
    weights and statistics come back bit for bit afterwards, also on error.
    `scale=0` runs once and gives the prediction of the SWA mean.

    Args:
        model: The built `keras.Model` trained with `source`.
        x: The inputs, as `model.predict` accepts them; also a Python
            generator or iterator of batches (`x`, `(x,)`, `(x, y)` or
            `(x, y, sample_weight)`, labels ignored), which is read once,
            before the first sample, and kept in memory.
        source: A `keras_swa.SWAG` callback that has folded in a snapshot.
        num_samples: Integer >= 1, the posterior samples. Defaults to `30`.
        scale: Float >= 0, the factor of the posterior covariance. Defaults
            to `0.5`.
        seed: Integer >= 0, or `None` for fresh samples; the same seed gives
            the same result (on one backend). Defaults to `0`.
        bn_data: Data to recompute the BatchNormalization statistics on for
            each sample, as `data` of `keras_swa.update_bn`. Defaults to
            `None`: the model's statistics are used for every sample.
        bn_steps: Integer >= 1, the batches of `bn_data` per sample at most.
            Defaults to `None`, all of them.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32.
        batch_size: Integer >= 1, the batch size of `model.predict`.
            Defaults to `None` (Keras' default for arrays, 32).
        from_logits: Whether the model outputs logits: they become
            probabilities by a softmax over the last axis, or by a sigmoid
            where the last axis has size 1 or the output is 1-D (a binary
            classifier). Otherwise the outputs are averaged as they are.
            Defaults to `False`.

    Returns:
        The mean probabilities as float32 NumPy arrays, in the structure of
        the model's outputs (accumulated in float64).

    Raises:
        TypeError: if `source` is not a `SWAG` callback, or an argument has
            the wrong type.
        ValueError: if `source` has no snapshot, holds another model's
            posterior, or an argument is out of range; the model is
            unchanged.

    Example:

    >>> swag = keras_swa.SWAG(start_epoch=0.5, bn_data=x_train)  # doctest: +SKIP
    >>> model.fit(x_train, y_train, epochs=20,
    ...           callbacks=[swag])  # doctest: +SKIP
    >>> probs = keras_swa.predict_bma(model, x_test, source=swag,
    ...                               bn_data=x_train,
    ...                               bn_steps=50)  # doctest: +SKIP
    >>> accuracy = (probs.argmax(-1) == y_test).mean()  # doctest: +SKIP
    """
    num_samples, scale, seed, bn, batch_size, from_logits = _check_arguments(
        model, x, source, num_samples, scale, seed, bn_data, bn_steps,
        batch_size, from_logits, bn_batch_size,
    )
    read_x, steps = _reader(x)
    total = None
    # All variables: `model.predict` may write non-trainable state, and on
    # JAX one that raises leaves every variable unset (Keras 3.15 purges).
    with swap.Swap(model.variables):
        for index in range(num_samples):
            sample_seed = None if seed is None else seed + index
            _assign_sample(model, source, scale, sample_seed, bn)
            probabilities = keras.tree.map_structure(
                lambda output: _probabilities(output, from_logits),
                model.predict(
                    read_x(), batch_size=batch_size, steps=steps, verbose=0
                ),
            )
            total = _add(total, probabilities)
    return keras.tree.map_structure(
        lambda summed: (summed / num_samples).astype("float32"), total
    )
