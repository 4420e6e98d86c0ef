"""Argument checks shared by the public classes, with messages that name the
argument and the accepted values."""

import numbers


def check_int(name, value, minimum):
    """Raises unless `value` is an integer >= `minimum`."""
    # `bool` is an `int` subclass, but `True` as a count or period is a bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value}"
        )


def check_learning_rate(name, value):
    """Raises unless `value` is a real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a float >= 0. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if not value >= 0:
        raise ValueError(
            f"`{name}` must be a float >= 0. Received: {name}={value}"
        )
