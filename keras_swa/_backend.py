"""The few lines that differ between Keras backends, kept in one place."""

import keras
from keras import ops


def conditional_assign(pred, variables, compute_new_values, assign):
    """Assigns `compute_new_values()` to `variables` where `pred` holds.

    On TensorFlow and PyTorch the branch assigns in place, so a step where
    `pred` is false touches no weights at all (TensorFlow: a `tf.cond` in the
    graph; PyTorch: a Python `if` on the concrete value). JAX forbids side
    effects inside `lax.cond`, so there the branches return values that are
    then assigned inside the trainer's stateless scope.

    Args:
        pred: Boolean scalar tensor, or the Python `True` when the update is
            known to happen while tracing (then there is no branch at all).
        variables: List of `keras.Variable`s.
        compute_new_values: Function of no arguments returning one new value
            per variable.
        assign: Function `(variable, value)` that writes a variable, such as
            the optimizer's own `assign`.
    """
    if pred is True:
        for variable, value in zip(variables, compute_new_values()):
            assign(variable, value)
        return
    if keras.backend.backend() == "jax":
        values = ops.cond(
            pred,
            lambda: list(compute_new_values()),
            lambda: [v.value for v in variables],
        )
        for variable, value in zip(variables, values):
            assign(variable, value)
        return

    def write():
        for variable, value in zip(variables, compute_new_values()):
            assign(variable, value)

    ops.cond(pred, write, lambda: None)
