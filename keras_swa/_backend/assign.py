"""Assignments inside the train step that only some steps make, per backend.

For optimizer wrappers that rewrite the model's weights around the inner
optimizer's update (`keras_swa.ScheduleFree`): a list of updates
`target <- fn(*args)`, run in order where a condition holds.
"""

import keras
from keras import ops

from keras_swa._backend import variable_value as _value


def assign_where(condition, updates) -> None:
    """Where `condition` holds, runs `updates` in order.

    Each update `(target, fn, args)` assigns `target <- fn(*values)`, cast
    to the target's dtype, where `values` are the values of `args`: a
    variable's value as earlier updates left it, or a tensor as it is.
    Inside a compiled train step or eagerly.

    Per backend: on TensorFlow the updates run in cross-replica context
    through the distribution strategy (the default one too), so that each
    replica computes its own copy from its own copies of the variables, as
    Keras updates the weights themselves; a `tf.cond` keeps them out of the
    steps where `condition` is false. JAX forbids side effects inside
    `lax.cond`: its branches return the new values, assigned afterwards (in
    the trainer's stateless scope). PyTorch runs eagerly: a Python `if`.

    Args:
        condition: Boolean scalar tensor, or `True` (no branch at all).
        updates: List of `(target, fn, args)`: `target` a `keras.Variable`,
            `fn` a function of as many tensors as `args`, and `args` a list
            of variables and tensors (tensors the same on every replica).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        _tf_assign_where(condition, updates)
        return
    if backend == "jax" and condition is not True:
        targets = _targets(updates)
        values = ops.cond(
            condition,
            lambda: _new_values(updates, targets),
            lambda: [_value(target) for target in targets],
        )
        for target, value in zip(targets, values):
            target.assign(value)
        return
    if condition is True or bool(condition):
        for target, fn, args in updates:
            target.assign(_computed(target, fn, [_read(a) for a in args]))


def _read(arg):
    if isinstance(arg, keras.Variable):
        return arg.value
    return arg


def _computed(target, fn, values):
    return ops.cast(fn(*values), target.dtype)


def _targets(updates):
    targets = []
    for target, _, _ in updates:
        if all(target is not seen for seen in targets):
            targets.append(target)
    return targets


def _new_values(updates, targets):
    """The values of `targets` after `updates`, computed without assigning
    (a later update reads the values earlier ones computed)."""
    written = {}

    def read(arg):
        if isinstance(arg, keras.Variable):
            return written.get(id(arg), arg.value)
        return arg

    for target, fn, args in updates:
        written[id(target)] = _computed(target, fn, [read(a) for a in args])
    return [written[id(target)] for target in targets]


def _tf_assign_where(condition, updates):
    import tensorflow as tf

    tensors = [
        arg
        for _, _, args in updates
        for arg in args
        if not isinstance(arg, keras.Variable)
    ]

    def merged(strategy, condition, *tensors):
        # Tensors crossing into cross-replica context arrive as per-replica
        # values; every replica computed the same, so the first one serves.
        def local(value):
            if isinstance(value, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(value)[0]
            return value

        condition = local(condition)
        tensors = iter([local(tensor) for tensor in tensors])
        resolved = [
            (
                target,
                fn,
                [
                    _value(arg) if isinstance(arg, keras.Variable)
                    else next(tensors)
                    for arg in args
                ],
            )
            for target, fn, args in updates
        ]

        def write():
            for target, fn, args in resolved:
                _tf_update(strategy, target, fn, args)

        if condition is True:
            write()
        else:
            tf.cond(condition, write, lambda: None)

    if tf.distribute.in_cross_replica_context():
        merged(tf.distribute.get_strategy(), condition, *tensors)
    else:
        tf.__internal__.distribute.interim.maybe_merge_call(
            merged, tf.distribute.get_strategy(), condition, *tensors
        )


def _tf_update(strategy, target, fn, args):
    import tensorflow as tf

    variable = _value(target)

    def assign(variable, *values):
        return variable.assign(
            ops.cast(fn(*values), variable.dtype)
        )

    if isinstance(variable, tf.distribute.DistributedValues):
        # Each replica's copy from that replica's copies of `args`.
        strategy.extended.update(variable, assign, args=tuple(args), group=False)
    else:
        assign(variable, *args)
