"""Assignments inside the train step that only some steps make, per backend.

For optimizer wrappers that rewrite the model's weights around the inner
optimizer's update (`keras_swa.ScheduleFree`): a list of updates
`target <- fn(*args)`, run in order where a condition holds, and
interpolations of many variables towards others, fused on PyTorch.
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


def lerp_where(condition, targets, ends, weight, weight_args=()) -> None:
    """Where `condition` holds: `target <- target + t (end - target)` for
    each pair, with `t = weight(*values of weight_args)` (any real `t`:
    extrapolations too).

    Computed in the dtype of `end` (float32 for a bfloat16 target of a
    float32 end), written in the target's. As `assign_where`, but on
    PyTorch one multi-tensor `lerp` for all pairs of a dtype instead of a
    few kernels per variable.

    Args:
        condition: As in `assign_where`.
        targets: List of `keras.Variable`s.
        ends: List of `keras.Variable`s of the same shapes.
        weight: Function of as many scalars as `weight_args`, returning `t`.
        weight_args: List of scalar variables or tensors. Defaults to `()`.
    """
    if keras.backend.backend() == "torch":
        if condition is True or bool(condition):
            # `t` may stay a tensor on the device: no read into Python, so
            # no wait for the device at every update.
            _torch_lerp(targets, ends, weight(*[_read(a) for a in weight_args]))
        return

    def lerp(target, end, *scalars):
        target = ops.cast(target, end.dtype)
        t = ops.cast(weight(*scalars), end.dtype)
        return target + t * (end - target)

    assign_where(
        condition,
        [
            (target, lerp, [target, end, *weight_args])
            for target, end in zip(targets, ends)
        ],
    )


def _torch_lerp(targets, ends, t):
    import torch

    same = [(a, b) for a, b in zip(targets, ends) if a.dtype == b.dtype]
    with torch.no_grad():
        # `_foreach_lerp_` is the multi-tensor kernel torch.optim itself
        # uses (no public equivalent).
        for dtype in {a.value.dtype for a, _ in same}:
            group = [(a, b) for a, b in same if a.value.dtype == dtype]
            weights = t
            if isinstance(t, torch.Tensor):
                # One weight tensor per pair, in the pair's dtype and place.
                weights = [t.to(group[0][0].value)] * len(group)
            torch._foreach_lerp_(
                [a.value for a, _ in group], [b.value for _, b in group],
                weights,
            )
        for target, end in zip(targets, ends):
            if target.dtype != end.dtype:
                wide = target.value.to(end.value.dtype)
                weight = t.to(wide) if isinstance(t, torch.Tensor) else t
                target.assign(torch.lerp(wide, end.value, weight))


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
