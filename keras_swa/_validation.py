"""Argument checks shared by every public function and class.

Each check returns the value as a plain Python value (NumPy scalars are
accepted wherever Python numbers are) or raises a `TypeError`/`ValueError`
that names the argument as the user wrote it, the value received and what is
accepted. `bool` is an `int` subclass, but `True` as a count, a period or a
rate is a bug, so numbers refuse booleans and booleans refuse everything else.
"""

import numbers

import keras
import numpy as np


def _received(name, value):
    return f"Received: {name}={value!r:.200} of type {type(value).__name__}"


def integer(name: str, value, minimum: int, optional: bool = False):
    """An integer >= `minimum` (or `None` when `optional`), as an `int`."""
    accepted = f"an integer >= {minimum}" + (" or None" if optional else "")
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, numbers.Integral
    ):
        raise TypeError(f"`{name}` must be {accepted}. {_received(name, value)}")
    if value < minimum:
        raise ValueError(f"`{name}` must be {accepted}. Received: {name}={value}")
    return int(value)


def real(
    name: str,
    value,
    minimum: float | None = None,
    below: float | None = None,
    optional: bool = False,
):
    """A real number with `minimum <= value < below` (either bound may be
    None; NaN is refused), as a `float`."""
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if below is not None:
        bounds.append(f"< {below}")
    accepted = "a float" + (" " + " and ".join(bounds) if bounds else "")
    accepted += " or None" if optional else ""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, numbers.Real
    ):
        raise TypeError(f"`{name}` must be {accepted}. {_received(name, value)}")
    value = float(value)
    if (
        value != value
        or (minimum is not None and value < minimum)
        or (below is not None and value >= below)
    ):
        raise ValueError(f"`{name}` must be {accepted}. Received: {name}={value}")
    return value


def boolean(name: str, value) -> bool:
    """`True` or `False` (a NumPy bool too), as a `bool`."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{name}` must be True or False. {_received(name, value)}"
        )
    return bool(value)


def choice(name: str, value, choices: tuple):
    """One of `choices` (an integer choice refuses booleans)."""
    for accepted in choices:
        if (
            isinstance(value, type(accepted))
            or (
                isinstance(value, numbers.Integral)
                and isinstance(accepted, int)
            )
        ) and not isinstance(value, (bool, np.bool_)) and value == accepted:
            return accepted
    raise ValueError(
        f"`{name}` must be one of {', '.join(map(repr, choices))}. "
        f"{_received(name, value)}"
    )


def verbose(name: str, value, choices=("auto", 0, 1, 2)):
    """A Keras verbosity mode: `"auto"`, 0, 1 or 2."""
    return choice(name, value, choices)


def model(name: str, value):
    """A built `keras.Model` or layer."""
    if not isinstance(value, keras.layers.Layer):
        raise TypeError(
            f"`{name}` must be a `keras.Model` (or layer). "
            f"{_received(name, value)}"
        )
    if not value.built:
        raise ValueError(
            f"`{name}` must be built: call it on a batch, or train it, "
            f"first. Received: {name}={value.name!r}, which is not built"
        )
    return value



def average_source(name: str, value):
    """Something that holds averaged weights: `n_averaged` and a callable
    `assign_average_vars(var_list)` (every keras_swa averager)."""
    if not hasattr(value, "n_averaged") or not callable(
        getattr(value, "assign_average_vars", None)
    ):
        raise TypeError(
            f"`{name}` must hold averaged weights: a keras_swa averaging "
            "optimizer (`SWA`, `EMA`, `PowerEMA`, `PostHocEMA` or one of its "
            "`profiles`; optionally inside a LossScaleOptimizer), a "
            "`StochasticWeightAveraging` or `SWAG` callback, or any object "
            "with `n_averaged` and `assign_average_vars(var_list)`. "
            f"{_received(name, value)}"
        )
    return value
